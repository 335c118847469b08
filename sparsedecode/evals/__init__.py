"""Long-context quality suites: RULER's synthetic tasks, the needle grid and long reasoning.

`run_eval(llm, suite, methods, lengths, samples, seed, batch_size, out_dir)` builds the prompts once
(determined by the seed and the tokenizer), runs every decode method on them and writes JSON, a markdown
table with each method's average, its 95% bootstrap interval and its paired difference to dense (`stats`),
and plots; it resumes a folder that holds results already, and `merge_results` merges folders;
`write_prompts` restores the samples.json of a folder kept without it. `run_recall`
(`attention_recall`) is the attention-recall diagnostic of the methods. The click command is
`sparsedecode.evals.cli.eval_command`.
"""
from .attention_recall import RecallReport, RecallTrace, run_recall, trace_recall
from .needle import DEFAULT_DEPTHS, needle_matrix, needle_samples
from .reasoning import reasoning_samples
from .ruler import NIAH_SPECS, RULER_TASKS, read_hotpotqa, read_squad, ruler_samples
from .results import EvalReport
from .runner import SUITES, MethodRun, build_samples, context_needed, merge_results, run_eval, write_prompts
from .samples import EvalResources, PromptFormat, Sample, generate_samples, length_tolerance
from .scoring import extract_final_number, number_match, score, string_match_all, string_match_part
from .stats import Interval, bootstrap_ci, paired_difference_ci

__all__ = [
    "DEFAULT_DEPTHS", "NIAH_SPECS", "RULER_TASKS", "SUITES",
    "EvalReport", "EvalResources", "Interval", "MethodRun", "PromptFormat", "RecallReport", "RecallTrace", "Sample",
    "bootstrap_ci", "build_samples", "context_needed", "extract_final_number", "generate_samples",
    "length_tolerance", "merge_results", "needle_matrix", "needle_samples", "number_match", "paired_difference_ci",
    "read_hotpotqa", "read_squad", "reasoning_samples", "ruler_samples", "run_eval", "run_recall", "score",
    "string_match_all", "string_match_part", "trace_recall", "write_prompts",
]
