"""Constants shared across layers (below every other module: imports nothing from the package)."""

# torchvision's ImageNet normalization, used by every published generator reproduced here.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Image files a dataset folder is searched for (lower case; matched case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
