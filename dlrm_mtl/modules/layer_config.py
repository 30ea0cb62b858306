"""What a scenario or task layer is built from besides its ``LayerConfig`` (``dlrm_mtl/config.py``).

Every layer type of the expert arch (``dlrm_mtl/models/arch.py``) is a class with

* ``CONFIG_FIELDS``: the ``LayerConfig`` fields it reads (a config that sets any other field
  to a non-default value is refused), and
* ``from_config(cfg, dims, where)``: the layer of ``cfg`` for the sizes ``dims``; it checks its
  own fields first and raises a ``ConfigError`` naming ``where`` (the layer's key).

A type that shares a class with another one but reads fewer fields (``separate`` = a CGC layer
without shared experts) is a *named builder*: a function ``(cfg, dims, where) -> module``
declaring its fields with :func:`reads_fields`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple, TypeVar

__all__ = ["LayerDims", "reads_fields"]


@dataclass(frozen=True)
class LayerDims:
    """The sizes a layer is built for, which come from the schema and the layers below it, not
    from its config. Scenario layers read ``num_scenarios`` and ``emb_dim``; task layers read
    ``context_dim`` and (a type whose fields name tasks) ``task_names``."""

    in_dim: int  # width of the layer's input rows
    num_tasks: int
    num_scenarios: int = 0  # scenario layers: values of the level that routes rows
    emb_dim: int = 0  # scenario layers: size of that level's scenario embedding
    context_dim: int = 0  # task layers: size of the concatenated scenario embeddings
    task_names: Tuple[str, ...] = ()  # the schema's tasks; () = named "0", "1", ...

    def task_name_list(self) -> List[str]:
        """The task names the layer's fields may use (``edges``): ``task_names``, or the task
        indices as strings when the layer is built without a schema."""
        return list(self.task_names) if self.task_names else [str(t) for t in range(self.num_tasks)]


BuilderT = TypeVar("BuilderT", bound=Callable[..., object])


def reads_fields(*fields: str) -> Callable[[BuilderT], BuilderT]:
    """Declares the ``LayerConfig`` fields a named builder reads (sets its ``CONFIG_FIELDS``)."""

    def declare(build: BuilderT) -> BuilderT:
        build.CONFIG_FIELDS = tuple(fields)  # type: ignore[attr-defined]
        return build

    return declare
