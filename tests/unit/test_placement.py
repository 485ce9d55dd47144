"""Which device each engine process gets: `--device` against replicas and tensor-parallel ranks."""

from __future__ import annotations

import pytest

from entity_llm_server.engine.launcher import Rank, placement


@pytest.mark.parametrize(
    ("device", "replicas", "tp", "expected"),
    [
        ("cpu", 1, 1, [["cpu"]]),
        ("cpu", 3, 1, [["cpu"], ["cpu"], ["cpu"]]),
        ("cuda:0,cuda:1", 2, 1, [["cuda:0"], ["cuda:1"]]),
        ("cuda:1", 2, 1, [["cuda:1"], ["cuda:1"]]),  # replicas may share a device
        ("cpu", 2, 2, [["cpu", "cpu"], ["cpu", "cpu"]]),
        ("cuda", 1, 2, [["cuda:0", "cuda:1"]]),
        ("cuda", 2, 2, [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]),
        ("cuda:3, cuda:2,cuda:1,cuda:0", 2, 2, [["cuda:3", "cuda:2"], ["cuda:1", "cuda:0"]]),
    ],
)
def test_each_process_gets_its_device(device, replicas, tp, expected):
    assert placement(device, replicas, tp) == expected


@pytest.mark.parametrize(
    ("device", "replicas", "tp", "message"),
    [
        ("cuda:0,cuda:1,cuda:2", 2, 1, "3 devices for 2 engine replicas: give one, or one per replica (2)"),
        ("cuda:0", 1, 2, "'cuda:0' is one device for 2 tensor-parallel ranks, which need one each"),
        ("cuda:0,cuda:1", 2, 2, "2 devices for 2 x 2 tensor-parallel ranks: give one, or one per process (4)"),
        ("cpu,", 1, 1, "device 'cpu,' has an empty entry"),
    ],
)
def test_a_device_list_that_fits_no_layout_is_refused_saying_why(device, replicas, tp, message):
    with pytest.raises(ValueError, match=r"^device") as caught:
        placement(device, replicas, tp)
    assert message in str(caught.value)


def test_a_rank_is_started_the_way_torch_distributed_expects():
    env = Rank(rank=1, world_size=2, port=29500, local_rank=3).environment("cuda:3")
    assert env["RANK"] == "1"
    assert env["WORLD_SIZE"] == "2"
    assert env["LOCAL_RANK"] == "3"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")
    assert "CUDA_VISIBLE_DEVICES" not in env
    # A CPU group on a GPU machine must not pick NCCL.
    assert Rank(0, 2, 29500, 0).environment("cpu")["CUDA_VISIBLE_DEVICES"] == ""
