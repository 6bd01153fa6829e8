"""PatchParallel's graph path (strategies/patches/graphs.py) on the CPU, where nothing is captured: the steady
forwards go through the executor (here eager, recording what it is asked for) and equal the eager path exactly;
the graphs are keyed by the slots each step writes and reads (two for the stale modes, one for no_sync), never by
the step, and the arguments' signature is one for the whole loop (the timestep is a tensor, not a number). The
real capture and replay are tests/cuda/test_patch_cuda.py's."""

import torch
from patch_cases import graph_path_keys

from asyncdiff_rt.tools.launch import spawn

MODES = ["corrected_async_gn", "no_sync"]


def test_graph_path_keys_and_equality_on_cpu():
    per_rank = spawn(graph_path_keys, 2, MODES, timeout_s=600)
    for rank, results in enumerate(per_rank):
        for mode, (eager, graph_path, keys, signatures) in zip(MODES, results):
            assert torch.equal(eager, graph_path), f"rank {rank} {mode}"
            assert signatures == 1, f"rank {rank} {mode}: {signatures} argument signatures"
            # 4 PNDM steps call the denoiser 5 times; warm_up=2: steps 2, 3, 4 are steady
            if mode == "no_sync":
                assert keys == [("patch", mode, None, 1)] * 3, keys
            else:
                assert keys == [("patch", mode, 0, 1), ("patch", mode, 1, 0), ("patch", mode, 0, 1)], keys
