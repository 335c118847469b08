"""Engine step wall time, graph launch host time and device time, SelectionStream off/on (diagnostic)."""
import gc, statistics, sys, time
import torch
import sparsedecode.methods.lychee as m
from sparsedecode import LLM, SamplingParams

orig = torch.cuda.CUDAGraph.replay
launch = []
def timed(self):
    t = time.perf_counter(); orig(self); launch.append(time.perf_counter() - t)
torch.cuda.CUDAGraph.replay = timed
ctx = int(sys.argv[1])  # usage: engine-step.py CONTEXT METHODS ORDER (131072 lychee 1010: stream on, off, on, off)
med = lambda xs: statistics.median(xs) * 1e3
for method in sys.argv[2].split(","):
    for on in [bool(int(c)) for c in sys.argv[3]]:
        m.SelectionStream.enabled = on
        opts = {} if method == "dense" else dict(roles="random:24", budget=4096)
        llm = LLM("random:llama-3.1-8b", method=method, max_context=ctx + 1024, max_num_seqs=1,
                  enable_prefix_caching=False, **opts)
        eng = llm.engine
        eng.capture_decode_steps()
        eng.add_request(torch.randint(100, 20000, (ctx,)).tolist(), SamplingParams(max_tokens=900, ignore_eos=True))
        for _ in range(ctx // 2048 + 40):
            eng.step()
        launch.clear(); walls, dev = [], []
        for _ in range(100):
            torch.cuda.synchronize(); t = time.perf_counter(); eng.step(); walls.append(time.perf_counter() - t)
        n = len(launch)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g = next(iter(eng.runner.graphs.values()))
        for _ in range(50):
            s.record(); orig(g); e.record(); e.synchronize(); dev.append(s.elapsed_time(e) / 1e3)
        print(f"{method:12s} stream={int(on)} engine.step {med(walls):.3f} ms  replay() host {med(launch[:n]):.3f} ms "
              f"device {med(dev):.3f} ms  (p90 engine {statistics.quantiles(walls, n=10)[-1]*1e3:.3f})", flush=True)
        del llm, eng, g; gc.collect(); torch.cuda.empty_cache()
