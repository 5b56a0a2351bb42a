"""Where each stage's outputs live, relative to the repository root (dvc.yaml names the same paths)."""
from pathlib import Path

DATA = Path("data")
SHARDS = DATA / "shards"  # fineweb_{val,train}_NNNNNN.bin
TOKENIZER = DATA / "tokenizer.model"
MANIFEST = DATA / "manifest.json"
DOC_INDEX = DATA / "docs.parquet"  # per-document split, tokens, bytes, hash

METRICS = Path("metrics")  # each stage's headline figures, flat (dvc metrics show, dvc exp show)
TRAIN_CURVE = METRICS / "train_curve.csv"

IMPORTS = Path("imports")  # a record's weights for train.import_from: the train stage's tracked dependency

ARTIFACTS = Path("artifacts")
CHECKPOINT = ARTIFACTS / "model.safetensors"  # the float checkpoint from train
RUNS = Path("runs")  # untracked: resumable checkpoints of interrupted runs
TRAIN_RUN = RUNS / "train"
LOCKS = RUNS / "locks"  # one lock file per stage: a second run of a running stage is refused
QUANTIZED = ARTIFACTS / "quant.safetensors"  # integer codes + scales from calibrate
ARTIFACT = ARTIFACTS / "model.pgolf"  # what would be submitted: code is counted beside it
LOADER_MODULE = Path("pgolf/artifact.py")  # the loader; it and every pgolf module it imports are counted

EVAL = Path("eval")
SCORES = EVAL / "score.parquet"  # pass-1 per-token records of the artifact's model
ADAPTED = EVAL / "adapt.parquet"  # per-token records after score-first test-time training (pass 1's schema)
RESCORES = EVAL / "rescore.parquet"  # per-token records after the causal cache
REPORT = Path("reports") / "report.md"  # the human report
PLOTS = Path("reports") / "plots"  # its figures as SVG: they render offline
DETAILS = Path("reports") / "details"  # what is too long for a metrics file: per-tensor errors, every rule
