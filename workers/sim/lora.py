"""LoRA adapters of the simulated worker, modelled on vLLM's (`reference/vllm-pd-lora-
continuation.md` §2): which adapters it serves, which sit in its `max_loras` GPU slots, and the
`vllm:lora_requests_info` series.

An adapter is served once registered (`--lora-modules`, or `POST /v1/load_lora_adapter` when
runtime updating is allowed). A batch holds requests of at most `max_loras` distinct adapters;
a request whose adapter is not in a slot takes a free one (or the least recently used idle one)
and its step pays `lora_load_s` for the load, as vLLM pays to page an adapter onto the GPU.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

from aiohttp import web

from router.vllm_wire.block_hash import LoraKey
from workers.sim.protocol import SimAPIError, bad_request, json_object

_SERIES_KEPT = 256
"""vLLM keeps every label combination it ever set; the simulator keeps the newest few."""


class SimAdapters:
    """Registered adapters (name -> path) and the GPU slots they occupy."""

    def __init__(self, modules: dict[str, str], max_loras: int) -> None:
        self.paths: dict[str, str] = dict(modules)
        self.max_loras = max_loras
        self._slots: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.loads = 0

    def key(self, name: str) -> LoraKey | None:
        path = self.paths.get(name)
        return None if path is None else (name, path)

    def register(self, name: str, path: str) -> None:
        self.paths[name] = path

    def unregister(self, name: str) -> None:
        self.paths.pop(name, None)
        self._slots.pop(name, None)

    def admit(self, name: str, active: set[str]) -> bool | None:
        """Give `name` a slot for a step whose batch already runs adapters `active`: True if
        it had to be loaded, False if it was resident, None if no slot can be freed now."""
        if name in self._slots:
            self._slots.move_to_end(name)
            return False
        if name not in active and len(active | {name}) > self.max_loras:
            return None
        if len(self._slots) >= self.max_loras:
            idle = next((n for n in self._slots if n not in active), None)
            if idle is None:
                return None
            del self._slots[idle]
        self._slots[name] = None
        self.loads += 1
        return True

    @property
    def resident(self) -> list[str]:
        return list(self._slots)


class LoraInfoSeries:
    """`vllm:lora_requests_info`: one gauge series per (running, waiting) pair ever seen, its
    value the last time that pair was current (so the newest series is the present)."""

    def __init__(self, max_loras: int) -> None:
        self._max = str(max_loras)
        self._series: OrderedDict[tuple[str, str], float] = OrderedDict()

    def record(self, running: Iterable[str], waiting: Iterable[str]) -> None:
        labels = (",".join(dict.fromkeys(running)), ",".join(dict.fromkeys(waiting)))
        self._series[labels] = time.time()
        self._series.move_to_end(labels)
        while len(self._series) > _SERIES_KEPT:
            self._series.popitem(last=False)

    def samples(self) -> list[tuple[list[str], float]]:
        """Label values (max_lora, running, waiting) and value of every series kept."""
        return [([self._max, r, w], t) for (r, w), t in self._series.items()]


SIM_ADAPTERS = web.AppKey("sim_adapters", SimAdapters)


def install_lora_routes(app: web.Application, adapters: SimAdapters) -> None:
    """vLLM's runtime adapter updates (only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
    app[SIM_ADAPTERS] = adapters
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)


async def load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's runtime load: 200 with a plain-text success line, 400 on a bad or duplicate name."""
    adapters = request.app[SIM_ADAPTERS]
    body = await json_object(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        return bad_request("Both 'lora_name' and 'lora_path' must be provided.").response()
    if name in adapters.paths and body.get("load_inplace") is not True:
        return bad_request(f"The lora adapter '{name}' has already been loaded.").response()
    adapters.register(name, path)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    adapters = request.app[SIM_ADAPTERS]
    body = await json_object(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        return bad_request("'lora_name' needs to be provided to unload a LoRA adapter.").response()
    if name not in adapters.paths:
        return SimAPIError(
            404, f"The lora adapter '{name}' cannot be found.", "NotFoundError"
        ).response()
    adapters.unregister(name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
