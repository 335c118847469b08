"""What a penalized batch's decode step costs: the engine's step (`LLMEngine.step`, one decode step each, host
included) over 8 sequences of the Llama-3.1-8B shape (random weights, dense) at 4K, without and with
penalties on every request, the two runs in turn, three times. On the GPU machine:
PYTHONPATH=. python3 docs/data/engine-h200/s21-penalties.py"""
import statistics
import time

import torch

from sparsedecode import LLM, SamplingParams

llm = LLM("random:llama-3.1-8b", max_context=8192, max_num_seqs=8, gpu_memory_utilization=0.5)
engine = llm.engine
engine.capture_decode_steps()
prompts = [[(31 * i + 7 * b) % 32000 + 1 for i in range(4096)] for b in range(8)]
settings = {
    "plain": dict(temperature=0.8, seed=1),
    "penalized": dict(temperature=0.8, seed=1, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5,
                      min_p=0.05, min_tokens=8, logit_bias={5: 1.0}),
}


def decode_step_ms(options: dict) -> float:
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=80, ignore_eos=True, **options))
    times = []
    while engine.has_unfinished_requests():
        decoding = all(not s.in_prefill for s in engine.scheduler.running) and not engine.scheduler.waiting
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - start)
    return statistics.median(times[10:]) * 1e3  # after the first steps (the penalized variant's capture)


results = {name: [] for name in settings}
for _ in range(3):
    for name, options in settings.items():
        results[name].append(decode_step_ms(options))
for name, values in results.items():
    print(f"{name}: engine step ms (median per run) {', '.join(f'{v:.3f}' for v in values)}")
plain, penalized = (statistics.median(results[n]) for n in settings)
print(f"penalized / plain: {penalized / plain:.4f} ({(penalized - plain) * 1e3:.0f} us a step)")
