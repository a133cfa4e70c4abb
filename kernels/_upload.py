"""The upload cache: small host-made tensors (launch tables, a float lr) copied to their device once
per value, device and stream, from pinned memory and without a host synchronisation.

It imports torch only, not Triton: pyops.optim's native step uploads its float lr through it on
machines without Triton. The Triton launchers reach it through kernels/_common.py (device_table).
"""

import torch


def upload(cache, lock, limit, key, make, device):
    """The tensor make() builds on the CPU, on `device`, cached in `cache` under (key, device, stream).

    A hit is one dict lookup and takes no lock: an entry evicted after it was looked up stays valid for
    that step (its tensors are referenced, and a launch that is not captured uses them on its own
    stream only). A miss takes `lock` (threads stepping their own optimizers share a cache) and, with
    `limit` entries already there, drops every entry that no CUDA graph uses. On CUDA the host tensor
    is pinned and copied without a host synchronisation, per stream (work on another stream never
    reads a copy whose upload that stream has not ordered). CUDA graphs replay the tensor a captured
    launch used, and a capture that had to create one records its upload: so an entry created or used
    during a capture keeps its host and device tensors for good.
    Entries are [host tensor, device tensor, used by a CUDA graph]."""
    is_cuda = device.type == "cuda"
    key = (key, device, torch.cuda.current_stream(device).cuda_stream if is_cuda else 0)
    entry = cache.get(key)
    capturing = is_cuda and torch.cuda.is_current_stream_capturing()
    if entry is None or capturing:
        with lock:  # looked up again: no other thread evicts between the lookup and the capture mark
            entry = cache.get(key)
            if entry is None:
                if len(cache) >= limit:
                    for k in [k for k, e in cache.items() if not e[2]]:
                        del cache[k]
                host = value = make()
                if is_cuda:
                    host = host.pin_memory()
                    value = torch.empty_like(host, device=device)
                    value.copy_(host, non_blocking=True)
                entry = cache[key] = [host, value, False]
            if capturing:
                entry[2] = True
    return entry[1]
