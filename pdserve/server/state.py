"""What the routes share: config, controller, metrics, and the pipeline once the workers are up."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

from fastapi import Request

from pdserve.engine.request import SamplingParams
from pdserve.http_common import freeze_startup_heap
from pdserve.server import messages as msg
from pdserve.server.api_common import request_peers, request_rooms
from pdserve.server.config import ServerConfig
from pdserve.server.controller import DPController
from pdserve.server.errors import ServerError
from pdserve.server.generation import GenerationService, GenRequest, close_all, run_to_end
from pdserve.server.kv_events_config import default_topic
from pdserve.server.metrics import ServerMetrics

MAX_PEERS_TOLD = 64  # a refused batch tells at most this many prefill rooms

logger = logging.getLogger("pdserve.server")


class ServerState:
    """Per-app state; ``service`` is None until every rank reported ready and the tokenizer loaded."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics(config.served_model_name or "", config.engine.page_size,
                                     config.prefix_caching_hash_algo, not config.engine.disable_radix_cache)
        self.controller = DPController(config, self.metrics)
        self.service: GenerationService | None = None
        self.served_model_name: str | None = None
        self.startup_error: str | None = None

    async def finish_startup(self) -> None:
        """Wait for the workers, then load the tokenizer they report; the server is healthy after."""
        await self.controller.ready_event.wait()
        info = self.controller.info
        from pdserve.sim.tokenizer import open_tokenizer

        try:
            tokenizer = await asyncio.to_thread(open_tokenizer, info.model_path, bool(self.config.engine.simulate))
        except Exception as e:
            self.startup_error = f"cannot load the tokenizer from {info.model_path}: {e}"
            logger.error("%s", self.startup_error)
            if self.controller.on_fatal is not None:
                self.controller.on_fatal(self.startup_error)
            return
        given = self.config.engine.model_path
        self.served_model_name = self.config.served_model_name or given or os.path.basename(info.model_path)
        self.metrics.set_model_name(self.served_model_name)
        publisher = self.controller.kv_publisher
        if publisher is not None and self.config.kv_events is not None and self.config.kv_events.topic is None:
            publisher.topic = default_topic(self.config.host, self.served_model_name)
        for state in self.controller.ranks:
            self.metrics.set_load(state.rank, state.load)
        self.service = GenerationService(self.controller, tokenizer)
        freeze_startup_heap()
        logger.info(
            "serving %s (%s) on http://%s:%d with %d DP rank(s)",
            self.served_model_name, info.model_path, self.config.host, self.config.port, self.config.dp_size,
        )

    @property
    def healthy(self) -> bool:
        return self.service is not None and self.controller.healthy

    def unhealthy_reason(self) -> str:
        if self.startup_error:
            return self.startup_error
        ranks = self.controller.ranks
        if self.service is not None and not any(s.phase == "ready" for s in ranks):
            return "no DP rank is serving: " + "; ".join(self.controller.rank_unavailable(s) for s in ranks)
        dead = [s for s in ranks if s.error]
        if dead:
            return "; ".join(s.error or "" for s in dead)
        return "the server is starting" if self.service is None else "the server is shutting down"

    def require_service(self) -> GenerationService:
        if self.service is None:
            raise ServerError(503, self.unhealthy_reason())
        return self.service

    def require_info(self) -> msg.WorkerReady:
        self.require_service()
        return self.controller.info

    def model_names(self) -> set[str]:
        """Names a client may put in ``model``: the served name, the model path as given and resolved."""
        names = {self.served_model_name, self.config.engine.model_path}
        if self.service is not None:
            names.add(self.controller.info.model_path)
        return {n for n in names if n}

    def refused(self, request: Request, error: ServerError) -> None:
        """A P/D front answered a request with an error (not 409: that room belongs to another request).
        Prefill: decode's half of each room it named fails at once with this reason. Decode: the
        prefill server named in the request is told, and fails its half at once."""
        if error.status == 409:
            return
        if self.config.disagg.mode == "decode":
            status = error.status if error.status < 500 else 503
            try:
                peers = request_peers(request, self.config.disagg.bootstrap_port)[:MAX_PEERS_TOLD]
            except Exception:  # an unreadable body names no peer; the error answer must still go out
                logger.debug("no peer readable in a refused request", exc_info=True)
                return
            for host, port, room in peers:
                if not self.config.disagg.bootstrap_allowed(host):
                    continue  # never contact an address the outbound allow-list refuses
                reason = (f"the decode server refused the request for bootstrap_room {room} with HTTP {error.status}: "
                          f"{error.message}")
                self.controller.tell_prefill(host, port, room, reason, status)
            return
        if self.config.disagg.mode != "prefill":
            return
        try:
            rooms, rank = request_rooms(request, self.config.dp_size)
        except Exception:  # an unreadable body names no room; the error answer must still go out
            logger.debug("no room readable in a refused request", exc_info=True)
            return
        for room in rooms:
            reason = (f"the prefill server refused the request for bootstrap_room {room} with HTTP {error.status}: "
                      f"{error.message}")
            self.controller.reject_room(room, rank, reason)

    async def probe_generate(self, timeout: float) -> str | None:
        """Generate one token on every rank; None when all answered, else what went wrong."""
        service = self.require_service()
        ids = service.encode("ping") or [0]
        reqs = [
            GenRequest(
                rid=f"health-{uuid.uuid4().hex}",
                input_ids=ids,
                params=SamplingParams(max_new_tokens=1, temperature=0.0),
                dp_rank=state.rank,
                health_probe=True,
            )
            for state in self.controller.ranks
            if state.phase == "ready"
        ]
        try:
            gens = service.start_all(reqs)
        except ServerError as e:
            return e.message
        try:
            await asyncio.wait_for(run_to_end(gens), timeout)
        except ServerError as e:
            return e.message
        except asyncio.TimeoutError:
            return f"no token within {timeout:.0f} s"
        finally:
            close_all(gens)
        return None
