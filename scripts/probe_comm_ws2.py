"""Probe on 2+ GPUs, to choose moecomm's collective algorithms (2026-11-30).

(A) host microseconds per call with the GPU queue kept full; (B) device microseconds of one call replayed
in a CUDA graph; (C) overlap of a full-SM grouped GEMM with NCCL vs copy-engine peer copies through
torch symmetric memory. Usage: python scripts/probe_comm_ws2.py  (all GPUs; prints a table, JSON to $OUT)
"""
import json
import os
import time

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from moecomm.launch import launch, rank_device

H = 7168


@triton.jit
def _touch(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)


def host_us(fn, n=40):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda._sleep(int(3e9))  # GPU busy far ahead: the host never waits below
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    dist.barrier()
    return dt * 1e6


def graph_us(fn, iters=50):
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / iters * 1e3
    except Exception as e:  # noqa: BLE001
        print(f"rank {dist.get_rank()}: graph failed: {str(e).splitlines()[0][:160]}", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def eager_us(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main():
    import torch.distributed._symmetric_memory as symm_mem

    rank, world, dev = dist.get_rank(), dist.get_world_size(), rank_device()
    out = {}
    # symmetric buffer: 24 K rows of bf16 hidden 7168 (344 MB)
    cap = 24576
    buf = symm_mem.empty(cap * H, device=dev, dtype=torch.bfloat16)
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    peers = [hdl.get_buffer(r, (cap, H), torch.bfloat16) for r in range(world)]
    small = torch.zeros(16, device=dev)

    def symm_gather(x, sizes, dst):  # own rows -> my symm buffer; barrier; pull every rank's rows (copy engine)
        peers[rank][: x.shape[0]].copy_(x)
        hdl.barrier(channel=0)
        o = 0
        for r, n in enumerate(sizes):
            if n:
                dst[o : o + n].copy_(peers[r][:n])
            o += n
        hdl.barrier(channel=1)  # nobody overwrites its buffer while a peer still reads it

    def symm_reduce(full, sizes, dst):  # partial -> my symm buffer; barrier; pull my rows of every rank, sum
        peers[rank][: full.shape[0]].copy_(full)
        hdl.barrier(channel=0)
        s = sum(sizes[:rank])
        n = sizes[rank]
        dst.copy_(peers[0][s : s + n])
        for r in range(1, world):
            dst.add_(peers[r][s : s + n])
        hdl.barrier(channel=1)

    # (A) host time per call, 16 rows per rank
    x16 = torch.randn(16, H, device=dev).bfloat16()
    g16 = torch.empty(16 * world, H, device=dev, dtype=torch.bfloat16)
    sizes_u = [10 + 11 * r for r in range(world)]
    xu = torch.randn(sizes_u[rank], H, device=dev).bfloat16()
    gu = torch.empty(sum(sizes_u), H, device=dev, dtype=torch.bfloat16)
    pu = torch.randn(sum(sizes_u), H, device=dev).bfloat16()
    ou = torch.empty(sizes_u[rank], H, device=dev, dtype=torch.bfloat16)
    host = {
        "torch copy_ (1 launch)": lambda: small.copy_(small),
        "torch.empty + copy_": lambda: torch.empty_like(small).copy_(small),
        "triton launch": lambda: _touch[(1,)](small, 16, BLOCK=16),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(g16, x16),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(x16, g16),
        "all_reduce": lambda: dist.all_reduce(g16),
        "all_gather list (uneven)": lambda: dist.all_gather(list(gu.split(sizes_u)), xu),
        "reduce_scatter list (uneven)": lambda: dist.reduce_scatter(ou, list(pu.split(sizes_u))),
        "coalesced broadcasts (uneven)": lambda: _coalesced(xu, gu, sizes_u, rank, dev),
        "symm barrier": lambda: hdl.barrier(channel=0),
        "symm gather (uneven)": lambda: symm_gather(xu, sizes_u, gu),
        "symm reduce (uneven)": lambda: symm_reduce(pu, sizes_u, ou),
    }
    for k, fn in host.items():
        try:
            out[f"host_us|{k}"] = host_us(fn)
        except Exception as e:  # noqa: BLE001
            print(f"rank {rank}: host {k} failed: {str(e).splitlines()[0][:160]}", flush=True)
            out[f"host_us|{k}"] = float("nan")

    # (B) device time (graphed) and eager time, gather and reduce
    for rows in (16, 256, 1024, 4096):
        for pattern in ("balanced", "skewed", "idle"):
            if pattern == "balanced":
                sz = [rows] * world
            elif pattern == "skewed":
                sz = [max(1, rows * 2 * (r + 1) // (world + 1)) for r in range(world)]
            else:
                sz = [0] + [rows * world // (world - 1)] * (world - 1)
            mx, tot = max(sz), sum(sz)
            x = torch.randn(sz[rank], H, device=dev).bfloat16()
            pin = torch.zeros(mx, H, device=dev, dtype=torch.bfloat16)
            pout = torch.empty(mx * world, H, device=dev, dtype=torch.bfloat16)
            g = torch.empty(tot, H, device=dev, dtype=torch.bfloat16)
            full = torch.randn(tot, H, device=dev).bfloat16()
            fullp = torch.randn(mx * world, H, device=dev).bfloat16()
            own = torch.empty(sz[rank], H, device=dev, dtype=torch.bfloat16)
            ownp = torch.empty(mx, H, device=dev, dtype=torch.bfloat16)
            work = torch.empty_like(full)
            s0 = sum(sz[:rank])
            cases = {
                "ag padded (pad copy + AG, no compaction)": lambda: (pin[: x.shape[0]].copy_(x), dist.all_gather_into_tensor(pout, pin)),
                "ag list": lambda: dist.all_gather(list(g.split(sz)), x),
                "ag coalesced broadcasts": lambda: _coalesced(x, g, sz, rank, dev),
                "ag symm copy-engine": lambda: symm_gather(x, sz, g),
                "rs padded (RS only, input already padded)": lambda: dist.reduce_scatter_tensor(ownp, fullp),
                "rs list": lambda: dist.reduce_scatter(own, list(full.split(sz))),
                "rs all_reduce + slice": lambda: (work.copy_(full), dist.all_reduce(work), own.copy_(work[s0 : s0 + sz[rank]])),
                "rs symm copy-engine": lambda: symm_reduce(full, sz, own),
            }
            for k, fn in cases.items():
                key = f"{pattern}|{sz}|{k}"
                try:
                    out[f"graph_us|{key}"] = graph_us(fn)
                    out[f"eager_us|{key}"] = eager_us(fn)
                except Exception as e:  # noqa: BLE001
                    print(f"rank {rank}: {key} failed: {str(e).splitlines()[0][:160]}", flush=True)
                    out[f"graph_us|{key}"] = out[f"eager_us|{key}"] = float("nan")

    # (C) overlap with a full-SM grouped GEMM (128 local experts, 16384 rows), comm = gather + reduce of 4096 rows
    E, I = 128, 2048
    w = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.01
    a = torch.randn(16384, H, device=dev, dtype=torch.bfloat16)
    offs = torch.linspace(16384 // E, 16384, E, device=dev).to(torch.int32)
    sz = [4096] * world
    x = torch.randn(4096, H, device=dev).bfloat16()
    g = torch.empty(4096 * world, H, device=dev, dtype=torch.bfloat16)
    own = torch.empty(4096, H, device=dev, dtype=torch.bfloat16)
    full = torch.randn(4096 * world, H, device=dev).bfloat16()
    side = torch.cuda.Stream()
    gemm = lambda: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)  # noqa: E731
    comms = {"nccl": lambda: (dist.all_gather_into_tensor(g, x), dist.reduce_scatter_tensor(own, full)),
             "symm copy-engine": lambda: (symm_gather(x, sz, g), symm_reduce(full, sz, own))}
    out["overlap|gemm alone"] = eager_us(gemm, 10)
    for name, comm in comms.items():
        def both(comm=comm):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                comm()
            gemm()
            torch.cuda.current_stream().wait_stream(side)
        out[f"overlap|{name} alone"] = eager_us(comm, 10)
        out[f"overlap|{name} serial with gemm"] = eager_us(lambda: (comm(), gemm()), 10)
        out[f"overlap|{name} two streams with gemm"] = eager_us(both, 10)
    vals = torch.tensor(list(out.values()), device=dev, dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(out.keys(), vals.tolist())) if rank == 0 else None


def _coalesced(x, g, sizes, rank, dev):
    o = sum(sizes[:rank])
    g[o : o + x.shape[0]].copy_(x)
    with dist._coalescing_manager(None, dev):
        o = 0
        for r, n in enumerate(sizes):
            if n:
                dist.broadcast(g[o : o + n], src=r)
            o += n


if __name__ == "__main__":
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    res = launch(main, torch.cuda.device_count(), (), timeout=540)[0]
    for k, v in res.items():
        print(f"{k:100} {v:10.1f}")
    if os.environ.get("OUT"):
        json.dump(res, open(os.path.join(os.environ["OUT"], "probe_comm_ws2.json"), "w"), indent=1)
