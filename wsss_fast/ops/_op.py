"""One way to define an op: a ``torch.library`` custom op whose implementation dispatches to
faces (DESIGN §3).

An op is declared once, by an annotated signature function whose body is the fake (meta)
function, and a list of ``Face`` s::

    @define_op("class_patch_reweight", faces=(
        Face("reference", class_patch_reweight_reference),
        Face("cpu", cpu_kernel("class_patch_reweight")),
        Face("triton", "wsss_fast.kernels.class_patch_reweight:class_patch_reweight_triton"),
        Face("cuda", "wsss_fast.ops._cuda_lib:class_patch_reweight"),
    ))
    def class_patch_reweight_op(attn: Tensor, gamma: float, patchcam: Optional[Tensor],
                                sqrt: bool) -> Tensor:
        return torch.empty_like(attn)

Each face says why it cannot take given inputs (xformers' ``not_supported_reasons``): the device
and build rules of its kind (``_backend.face_unavailable``) plus its own limits
(``Face.limits(*args) -> list[str]``). Dispatch takes the forced face (``WSSS_FAST_BACKEND``) or
the first face of the device's default order that takes the inputs, falling back past the others;
when the forced face, or every face, declines, one ``BackendUnavailable`` lists every face's
reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from wsss_fast.ops import _backend

NAMESPACE = "wsss_fast"


def _no_limits(*args) -> list[str]:
    return []


def _resolve(target: Union[str, Callable]) -> Callable:
    """``"package.module:attribute"`` imported on first use (faces import triton or the CUDA
    wrapper only when they run), or a callable as is."""
    if callable(target):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def cpu_kernel(name: str) -> Callable:
    """The runner of the C++ op ``torch.ops.wsss_fast_C.<name>`` (looked up when called, after
    the face check has loaded the extension)."""

    def run(*args):
        return getattr(torch.ops.wsss_fast_C, name)(*args)

    run.__name__ = f"wsss_fast_C.{name}"
    return run


@dataclasses.dataclass(frozen=True)
class Face:
    """One implementation of an op.

    Attributes:
        kind: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (decides the device and
            build rules, see ``_backend.face_unavailable``).
        run: the implementation, called with the op's arguments; a callable or
            ``"module:attribute"`` imported on first use.
        limits: ``limits(*args) -> list[str]``, why this face cannot take these (validated)
            inputs beyond the device and build rules; empty when it can.
    """

    kind: str
    run: Union[str, Callable]
    limits: Callable[..., list[str]] = _no_limits

    def __post_init__(self):
        if self.kind not in _backend.FACES:
            raise ValueError(f"unknown face kind {self.kind!r}; expected one of {_backend.FACES}")

    def supports(self, device: torch.device, *args) -> list[str]:
        """Every reason this face cannot run ``args`` (on ``device``); empty when it can."""
        reason = _backend.face_unavailable(self.kind, device)
        if reason is not None:
            return [reason]  # the op's own limits may need the face's library: not asked
        return list(self.limits(*args))

    def __call__(self, *args):
        return _resolve(self.run)(*args)


def _device_of(args: Iterable) -> torch.device:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)):
            for item in arg:
                if isinstance(item, torch.Tensor):
                    return item.device
    raise ValueError("an op needs at least one tensor argument to pick a face")


def _check_faces(name: str, faces: Sequence[Face]) -> None:
    kinds = [face.kind for face in faces]
    if len(set(kinds)) != len(kinds) or "reference" not in kinds:
        raise ValueError(f"{name}: faces must be distinct kinds including 'reference', got {kinds}")


class Op:
    """A defined op: call it like the signature function; ``faces`` maps kind to ``Face``."""

    def __init__(self, name: str, faces: Sequence[Face], signature: Callable):
        _check_faces(name, faces)
        self.name = name
        self.faces = {face.kind: face for face in faces}
        self.custom_op = None  # set by define_op once registered
        functools.update_wrapper(self, signature)

    def supports(self, kind: str, *args) -> list[str]:
        """Why face ``kind`` cannot run ``args`` (empty when it can)."""
        if kind not in self.faces:
            return [f"{self.name} has no {kind} face"]
        return self.faces[kind].supports(_device_of(args), *args)

    def choose(self, *args) -> str:
        """The face that runs ``args`` (forced, or the first of the default order that can)."""
        device = _device_of(args)
        declines = {kind: functools.partial(face.supports, device, *args)
                    for kind, face in self.faces.items()}
        return _backend.select_face(self.name, declines, device)

    def dispatch(self, *args):
        return self.faces[self.choose(*args)](*args)

    def __call__(self, *args):
        return self.custom_op(*args)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, faces={tuple(self.faces)})"


def define_op(name: str, *, faces: Sequence[Face], mutates_args: Sequence[str] = (),
              backward: Optional[Callable] = None, setup_context: Optional[Callable] = None,
              namespace: str = NAMESPACE) -> Callable[[Callable], Op]:
    """Decorator: the annotated function gives the schema and is the fake (meta) function; the
    result is an ``Op`` registered as ``torch.ops.<namespace>.<name>``. ``backward`` and
    ``setup_context`` register autograd (``torch.library.register_autograd``)."""

    def wrap(signature: Callable) -> Op:
        op = Op(name, faces, signature)  # checks the faces before anything is registered
        # The schema comes from the signature (its annotations resolve in its own module).
        schema = torch.library.infer_schema(signature, mutates_args=tuple(mutates_args))
        op.custom_op = torch.library.custom_op(f"{namespace}::{name}", op.dispatch,
                                               mutates_args=tuple(mutates_args), schema=schema)
        op.custom_op.register_fake(signature)
        if backward is not None:
            op.custom_op.register_autograd(backward, setup_context=setup_context)
        return op

    return wrap


_TENSOR_SLOT = object()  # marks where a saved tensor goes back into the flattened inputs


def reference_autograd(reference: Callable) -> dict:
    """``backward`` and ``setup_context`` for ``define_op`` that differentiate ``reference`` (the
    specification face) at the saved inputs: the forward runs the fused face, the backward
    re-runs the reference under autograd. Meant for ops whose reference is cheap (no ``N×N``
    temporaries). Tensor-list inputs get a list of gradients."""

    def setup_context(ctx, inputs, output):
        flat, spec = torch.utils._pytree.tree_flatten(list(inputs))
        ctx.save_for_backward(*[x for x in flat if isinstance(x, torch.Tensor)])
        ctx.flat = [_TENSOR_SLOT if isinstance(x, torch.Tensor) else x for x in flat]
        ctx.spec = spec

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        with torch.enable_grad():
            flat = []
            for slot in ctx.flat:
                if slot is _TENSOR_SLOT:
                    tensor = next(saved).detach()
                    slot = tensor.requires_grad_(tensor.is_floating_point())
                flat.append(slot)
            inputs = torch.utils._pytree.tree_unflatten(flat, ctx.spec)
            leaves = [x for x in flat if isinstance(x, torch.Tensor) and x.requires_grad]
            grads = iter(torch.autograd.grad(reference(*inputs), leaves, grad, allow_unused=True))
        by_leaf = {id(leaf): next(grads) for leaf in leaves}

        def grad_of(x):
            if isinstance(x, (list, tuple)):
                return [grad_of(item) for item in x]
            return by_leaf.get(id(x)) if isinstance(x, torch.Tensor) else None

        return tuple(grad_of(x) if needed else None
                     for x, needed in zip(inputs, ctx.needs_input_grad))

    return {"backward": backward, "setup_context": setup_context}
