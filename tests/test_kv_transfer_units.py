"""``kv_transfer_params`` parsing (pdserve/server/kv_transfer.py) without servers: which leg each
flow's params ask for, the room both legs derive, and refusals naming the key."""

from __future__ import annotations

import pytest

from pdserve.disagg.vllm_ids import MAX_ROOM, engine_id, parse_engine_id, transfer_room
from pdserve.server import kv_transfer
from pdserve.server.errors import ServerError

INSTANCE = "0123456789abcdef"


def allowed(host: str) -> bool:
    return host.startswith("127.")


def parse(params, mode: str = "decode", prompt_tokens: int = 10):
    return kv_transfer.parse(params, mode, allowed, 4, prompt_tokens)


def refused(params, mode: str = "decode") -> str:
    with pytest.raises(ServerError) as info:
        parse(params, mode)
    assert info.value.status == 400
    return info.value.param


def test_engine_ids_round_trip_and_rooms_are_stable():
    assert parse_engine_id(engine_id(INSTANCE, 5)) == (INSTANCE, 5)
    assert parse_engine_id("pdserve-0123-dp1") is None and parse_engine_id(engine_id(INSTANCE, 1) + "x") is None
    assert transfer_room("xfer-a") == transfer_room("xfer-a") != transfer_room("xfer-b")
    assert 0 <= transfer_room("xfer-a") < MAX_ROOM


def test_nixl_prefill_then_decode_from_its_answer():
    leg = parse({"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}, "prefill")
    assert isinstance(leg, kv_transfer.PrefillLeg) and leg.transfer_id is None and 0 <= leg.room < MAX_ROOM
    answer = kv_transfer.prefill_answer(leg, INSTANCE, 1, "127.0.0.1", 8998, "cmpl-1")
    decode = parse(answer)
    assert isinstance(decode, kv_transfer.DecodeLeg)
    assert (decode.room, decode.host, decode.port, decode.prefill_rank, decode.instance, decode.room_known) == (
        leg.room, "127.0.0.1", 8998, 1, INSTANCE, True)


def test_mooncake_legs_share_the_transfer_ids_room():
    prefill = parse({"do_remote_decode": True, "do_remote_prefill": False, "transfer_id": "xfer-1"}, "prefill")
    decode = parse({"do_remote_decode": False, "do_remote_prefill": True, "transfer_id": "xfer-1",
                    "remote_bootstrap_addr": "http://127.0.0.1:8998", "remote_engine_id": engine_id(INSTANCE, 0)})
    assert prefill.room == decode.room == transfer_room("xfer-1")
    assert (decode.host, decode.port, decode.prefill_rank, decode.room_known) == ("127.0.0.1", 8998, 0, False)


def test_no_flag_is_nothing_to_do_and_values_without_a_flag_are_refused():
    assert parse(None) is None and parse({"do_remote_decode": False, "do_remote_prefill": False}) is None
    assert refused({"remote_room": 5}) == "kv_transfer_params.remote_room"


@pytest.mark.parametrize("params,mode,field", [
    ([1], "decode", "kv_transfer_params"),
    ({"do_remote_decode": True, "remote_host": "127.0.0.1"}, "prefill", "kv_transfer_params.remote_host"),
    ({"do_remote_decode": True}, "decode", "kv_transfer_params.do_remote_decode"),
    ({"do_remote_decode": True}, "null", "kv_transfer_params.do_remote_decode"),
    ({"do_remote_decode": True, "transfer_id": ""}, "prefill", "kv_transfer_params.transfer_id"),
    ({"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 1, "remote_room": 1},
     "decode", "kv_transfer_params.remote_engine_id"),
    ({"do_remote_prefill": True, "remote_engine_id": engine_id(INSTANCE, 0), "remote_port": 1, "remote_room": 1},
     "decode", "kv_transfer_params.remote_host"),
    ({"do_remote_prefill": True, "remote_engine_id": engine_id(INSTANCE, 0), "remote_host": "127.0.0.1",
      "remote_room": 1}, "decode", "kv_transfer_params.remote_port"),
    ({"do_remote_prefill": True, "remote_engine_id": engine_id(INSTANCE, 0), "remote_host": "127.0.0.1",
      "remote_port": 1}, "decode", "kv_transfer_params.remote_room"),
    ({"do_remote_prefill": True, "remote_engine_id": engine_id(INSTANCE, 0), "transfer_id": "t",
      "remote_bootstrap_addr": "http://127.0.0.1:1/x"}, "decode", "kv_transfer_params.remote_bootstrap_addr"),
    ({"do_remote_prefill": True, "remote_engine_id": engine_id(INSTANCE, 0), "transfer_id": "t",
      "remote_bootstrap_addr": "http://127.0.0.1:1", "remote_room": 3}, "decode", "kv_transfer_params.remote_room"),
    ({"do_remote_prefill": True, "remote_engine_id": engine_id(INSTANCE, 0), "transfer_id": "t",
      "remote_bootstrap_addr": "http://127.0.0.1:1", "remote_block_ids": [1, 1, 2]}, "decode",
     "kv_transfer_params.remote_block_ids"),  # 10 tokens are 3 pages of 4, but the ids repeat
    ({"do_remote_prefill": True, "remote_engine_id": engine_id(INSTANCE, 0), "transfer_id": "t",
      "remote_bootstrap_addr": "http://127.0.0.1:1", "remote_block_ids": [1, True, 2]}, "decode",
     "kv_transfer_params.remote_block_ids"),
])
def test_refusals_name_the_key(params, mode, field):
    assert refused(params, mode) == field
