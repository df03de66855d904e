"""Every user mistake ends the same way: exit status 2, one `persrec: ...` line naming the option or file and
what was expected, no traceback, and nothing written under the run's checkpoint_dir.

The cases go through the real entry point (`persrec.cli.main`). To add one, append a `Case` to `CASES`: `argv`
may use `{tmp}` (the case's own directory, also its checkpoint_dir) and `{data}` (a tiny prepared dataset), and
`setup` may create files or patch the environment first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from persrec.cli import main
from persrec.config import load_config, save_config
from tests.conftest import cli_flags, tiny_overrides


@dataclass(frozen=True)
class Env:
    """What a case's setup may use: its directory, the tiny dataset and pytest's monkeypatch."""

    tmp: Path
    data: Path
    monkeypatch: pytest.MonkeyPatch


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    # A substring of the one error line: the option or file named, or what was expected.
    expect: str
    setup: Callable[[Env], None] | None = None


# A run on the tiny dataset that would train in seconds, written under the case's directory.
TINY = cli_flags(tiny_overrides(Path("{data}"), Path("{tmp}"), epochs=1))
EXPERTS = [
    *("--number_of_user_tokens", "2", "--pretrain_item_num", "8", "--recent_item_num", "8"),
]


def train(*flags: str) -> list[str]:
    """`persrec train` of the tiny run with `flags` added (later flags win)."""
    return ["train", *TINY, *flags]


def write(relative: str, text: str | bytes) -> Callable[[Env], None]:
    """A setup that writes `text` to `{tmp}/relative`."""

    def setup(env: Env) -> None:
        path = env.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return setup


def saved_run(weights: str | None, **config: object) -> Callable[[Env], None]:
    """A setup that leaves `{tmp}/saved/` as a checkpoint of the tiny model.

    weights: "garbage" (not safetensors), "other" (weights of a model of another width) or None (none).
    """

    def setup(env: Env) -> None:
        from persrec.data.store import PreparedDataset
        from persrec.train.build import build_model
        from persrec.train.checkpoint import save_weights

        folder = env.tmp / "saved"
        folder.mkdir()
        settings = load_config(overrides=tiny_overrides(env.data, env.tmp, **config))
        save_config(settings, folder / "config.yaml")
        if weights == "garbage":
            (folder / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
        elif weights == "other":
            store = PreparedDataset.open(env.data)
            model = build_model(settings.replace(item_embedding_size=8), store.num_items, store.num_users)
            save_weights(model, folder / "model.safetensors")

    return setup


def trained_run(tamper: str | None = None) -> Callable[[Env], None]:
    """A setup that trains the tiny run for one epoch into `{tmp}/run`.

    tamper: "payload" (optimizer.pt unpickles into code), "other dataset" (a second, different prepared
    dataset at `{tmp}/other`) or None.
    """

    def setup(env: Env) -> None:
        argv = [a.replace("{tmp}", str(env.tmp)).replace("{data}", str(env.data)) for a in train()]
        assert main([*argv, "--popularity_baseline", "false"]) == 0
        if tamper == "payload":
            from persrec.train.checkpoint import latest_checkpoint

            torch.save(
                {"optimizer": _Payload(env.tmp / "ran")}, latest_checkpoint(env.tmp / "run") / "optimizer.pt"
            )
        elif tamper == "other dataset":
            from persrec.data.datasets.synthetic import generate_synthetic
            from persrec.data.prepare import prepare_dataset
            from tests.conftest import TINY as TINY_DATA

            built = generate_synthetic(dataclasses.replace(TINY_DATA, seed=11), env.tmp / "raw")
            prepare_dataset(built.interactions, env.tmp / "other", items=built.items, progress=False)

    return setup


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def tiny_parquet(relative: str, damage: bool = False) -> Callable[[Env], None]:
    """A setup that writes a small interactions parquet; `damage` overwrites bytes in its middle."""

    def setup(env: Env) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = env.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        n = 2000
        table = pa.table(
            {
                "user_id": [i % 50 for i in range(n)],
                "item_id": [i % 97 for i in range(n)],
                "timestamp": list(range(n)),
            }
        )
        pq.write_table(table, path, compression="snappy")
        if damage:
            data = bytearray(path.read_bytes())
            middle = len(data) // 2
            data[middle : middle + 64] = b"\xff" * 64
            path.write_bytes(bytes(data))

    return setup


def without_tensorboard(env: Env) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "tensorboard" else real(name, *args, **kwargs)

    env.monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def without_deepspeed(env: Env) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "deepspeed" else real(name, *args, **kwargs)

    env.monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def without_cuda(env: Env) -> None:
    env.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def raw_files(files: dict[str, dict[str, list[object]] | str]) -> Callable[[Env], None]:
    """A setup that writes raw dataset files under `{tmp}` (dicts as parquet) and keeps the build cache outside
    it, so that a builder that fails leaves `{tmp}` as it was."""

    def setup(env: Env) -> None:
        import gzip

        import pyarrow as pa
        import pyarrow.parquet as pq

        env.monkeypatch.setenv("PERSREC_CACHE_DIR", str(env.tmp.parent / f"{env.tmp.name}-cache"))
        for relative, content in files.items():
            path = env.tmp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                pq.write_table(pa.table(content), path)
            elif relative.endswith(".gz"):
                with gzip.open(path, "wt") as handle:
                    handle.write(content)
            else:
                path.write_text(content)

    return setup


def prepare_format(name: str, *flags: str) -> list[str]:
    return ["prepare", "--format", name, "--input", "{tmp}/in", "--output", "{tmp}/out", *flags]


CASES = [
    # ---- config values ----
    Case(
        "train_batch_size 0", train("--train_batch_size", "0"), "--train_batch_size: expected an integer >= 1"
    ),
    Case("eval_batch_size -1", train("--eval_batch_size", "-1"), "--eval_batch_size"),
    Case("num_negatives -1", train("--num_negatives", "-1"), "--num_negatives: expected an integer >= 0"),
    Case("temperature 0", train("--temperature", "0"), "--temperature: expected a number > 0"),
    Case("temperature nan", train("--temperature", "nan"), "--temperature: expected a finite number"),
    Case("learning rate < 0", train("--optim_args.learning_rate", "-1e-3"), "--optim_args.learning_rate"),
    Case("eps 0", train("--optim_args.eps", "0"), "--optim_args.eps: expected a number > 0"),
    Case("beta1 1", train("--optim_args.beta1", "1"), "--optim_args.beta1: expected a number in [0, 1)"),
    Case("beta2 < 0", train("--optim_args.beta2", "-0.1"), "--optim_args.beta2"),
    Case("warmup_steps -1", train("--optim_args.warmup_steps", "-1"), "--optim_args.warmup_steps"),
    Case("max_grad_norm -1", train("--optim_args.max_grad_norm", "-1"), "--optim_args.max_grad_norm"),
    Case("min_lr_ratio 1.5", train("--optim_args.min_lr_ratio", "1.5"), "--optim_args.min_lr_ratio"),
    Case("scheduler", train("--optim_args.scheduler", "linear"), "--optim_args.scheduler: expected one of"),
    Case("eval_interval 0", train("--eval_interval", "0"), "--eval_interval"),
    Case("topk empty", train("--topk", "[]"), "--topk: expected distinct cutoffs"),
    Case("topk 0", train("--topk", "10,0"), "--topk"),
    Case("topk repeated", train("--topk", "10,10"), "--topk"),
    Case("topk unparsable", train("--topk", "[5, 10"), "--topk: expected list of int"),
    Case("item_embedding_size 0", train("--item_embedding_size", "0"), "--item_embedding_size"),
    Case("n_layers 0", train("--n_layers", "0"), "--n_layers"),
    Case("n_heads 0", train("--n_heads", "0"), "--n_heads"),
    Case("n_heads not a divisor", train("--n_heads", "3"), "--n_heads: expected a divisor"),
    Case("MAX_ITEM_LIST_LENGTH 0", train("--MAX_ITEM_LIST_LENGTH", "0"), "--MAX_ITEM_LIST_LENGTH"),
    Case("inner_size -1", train("--inner_size", "-1"), "--inner_size"),
    Case("hstu_qk_dim -1", train("--hstu_qk_dim", "-4"), "--hstu_qk_dim"),
    Case("epochs -1", train("--epochs", "-1"), "--epochs"),
    Case("epochs not a number", train("--epochs", "many"), "--epochs: expected int, got 'many'"),
    Case("number_of_user_tokens -1", train("--number_of_user_tokens", "-1"), "--number_of_user_tokens"),
    Case("stopping_step -1", train("--stopping_step", "-1"), "--stopping_step"),
    Case("save_every_steps -1", train("--save_every_steps", "-1"), "--save_every_steps"),
    Case("max_steps -1", train("--max_steps", "-1"), "--max_steps"),
    Case("num_workers -1", train("--num_workers", "-1"), "--num_workers"),
    Case(
        "hidden dropout 1",
        train("--hidden_dropout_prob", "1"),
        "--hidden_dropout_prob: expected a probability",
    ),
    Case("attn dropout < 0", train("--attn_dropout_prob", "-0.1"), "--attn_dropout_prob"),
    Case("item_dropout 1.5", train(*EXPERTS, "--item_dropout", "1.5"), "--item_dropout"),
    Case("bool", train("--fix_temp", "maybe"), "--fix_temp: expected true or false"),
    Case("logger", train("--logger", "wandb"), "--logger: expected one of csv, tensorboard, none"),
    Case("precision", train("--precision", "fp16"), "--precision: expected one of auto, fp32, bf16"),
    Case("attention kernel", train("--attention_implementation", "flash"), "--attention_implementation"),
    Case("model", train("--model", "GRU4Rec"), "--model: unknown model 'GRU4Rec'"),
    Case("loss", train("--loss", "bpr"), "--loss: expected one of nce"),
    Case("valid_metric cutoff", train("--valid_metric", "ndcg@50"), "add 50 to --topk"),
    Case("valid_metric case", train("--valid_metric", "NDCG@10"), "did you mean 'ndcg@10'"),
    Case("valid_metric name", train("--valid_metric", "auc"), "--valid_metric: 'auc' is not measured"),
    Case("item_start_position", train("--item_start_position", "40"), "--item_start_position"),
    Case("experts without tokens", train("--model", "PersonalizedHSTU"), "--number_of_user_tokens"),
    Case("P + R", train(*EXPERTS, "--recent_item_num", "4"), "--MAX_ITEM_LIST_LENGTH 16"),
    Case(
        "insert_method not JSON", train(*EXPERTS, "--insert_method", "after8"), "--insert_method: expected 0"
    ),
    Case("insert_method pairs", train(*EXPERTS, "--insert_method", "[8, 2]"), "--insert_method: expected 0"),
    Case("insert_method counts", train(*EXPERTS, "--insert_method", "[[8, 1]]"), "--insert_method [[8, 1]]"),
    Case("checkpoint_dir a file", train("--checkpoint_dir", "{tmp}/f"), "--checkpoint_dir", write("f", "x")),
    # ---- unknown keys and suggestions ----
    Case("key case", train("--max_item_list_length", "8"), "did you mean --MAX_ITEM_LIST_LENGTH?"),
    Case("section missing", train("--learning_rate", "1"), "did you mean --optim_args.learning_rate?"),
    Case(
        "section field", train("--optim_args.learningrate", "1"), "did you mean --optim_args.learning_rate?"
    ),
    Case("typo", train("--epoch", "3"), "unknown option --epoch; did you mean --epochs?"),
    Case("section as value", train("--optim_args", "3"), "--optim_args is a section"),
    Case("stray argument", train("stray"), "unexpected argument 'stray'"),
    Case("quickstart key", ["quickstart", "--checkpoint_dir", "{tmp}", "--epochz", "1"], "--epochs"),
    # ---- datasets, packages and devices ----
    Case(
        "dataset name",
        train("--dataset", "ml-2m"),
        "named dataset (amazon-reviews, eb_nerd_512, ebnerd, merrec, merrec_2000, ml-1m, ml-latest-small",
    ),
    Case("dataset path", train("--dataset", "{tmp}/nowhere/data"), "no prepared dataset at"),
    Case("dataset dir", train("--dataset", "{tmp}/raw"), "not a prepared dataset", write("raw/a.csv", "1")),
    Case(
        "tensorboard",
        train("--logger", "tensorboard"),
        "pip install 'persrec[tensorboard]'",
        without_tensorboard,
    ),
    Case("cuda", train("--device", "cuda"), "--device cuda: CUDA is not available", without_cuda),
    Case("device name", train("--device", "gpu"), "--device: expected auto, cpu, cuda or cuda:N"),
    # ---- config files ----
    Case(
        "yaml syntax",
        train("--config_file", "{tmp}/bad.yaml"),
        "bad.yaml:2:12: invalid YAML: mapping values are not allowed here",
        write("bad.yaml", "epochs: 3\nn_layers: x: 2\n"),
    ),
    Case(
        "yaml unclosed",
        train("--config_file", "{tmp}/open.yaml"),
        "flow sequence started at line 2",
        write("open.yaml", "epochs: 3\ntopk: [1, 2\n"),
    ),
    Case(
        "yaml list",
        train("--config_file", "{tmp}/l.yaml"),
        "l.yaml must hold a mapping",
        write("l.yaml", "- 1\n"),
    ),
    Case("yaml key", train("--config_file", "{tmp}/k.yaml"), "'n_layer' in", write("k.yaml", "n_layer: 2\n")),
    Case("config_file dir", train("--config_file", "{tmp}"), "is a directory; expected a YAML file"),
    Case("config_file missing", train("--config_file", "{tmp}/none.yaml"), "none.yaml does not exist"),
    Case("config_file empty", train("--config_file"), "--config_file: expected one or more YAML files"),
    # ---- persrec evaluate ----
    Case("evaluate missing path", ["evaluate", "{tmp}/nope"], "nope does not exist"),
    Case("evaluate no weights", ["evaluate", "{tmp}/saved"], "no model.safetensors found", saved_run(None)),
    Case(
        "evaluate garbage weights",
        ["evaluate", "{tmp}/saved"],
        "model.safetensors is not a readable safetensors weights file",
        saved_run("garbage"),
    ),
    Case("evaluate other model", ["evaluate", "{tmp}/saved"], "does not match the model", saved_run("other")),
    Case("evaluate override", ["evaluate", "{tmp}/saved", "--topk", "0"], "--topk", saved_run("garbage")),
    Case(
        "evaluate compare_cache",
        ["evaluate", "{tmp}/saved", "--compare_cache", "true"],
        "--compare_cache needs an expert model",
        saved_run("garbage"),
    ),
    Case(
        "evaluate no config",
        ["evaluate", "{tmp}/w"],
        "config.yaml is missing",
        write("w/model.safetensors", b"0"),
    ),
    Case("evaluate no argument", ["evaluate"], "evaluate: the following arguments are required: checkpoint"),
    # ---- strategies ----
    Case("strategy", train("--strategy", "fsdp2"), "--strategy: expected one of ddp, fsdp, deepspeed"),
    Case("stage", train("--stage", "1"), "--stage: expected a DeepSpeed ZeRO stage, 2 or 3, got 1"),
    Case(
        "deepspeed missing",
        train("--strategy", "deepspeed"),
        "--strategy deepspeed needs the deepspeed package: pip install 'persrec[deepspeed]'",
        without_deepspeed,
    ),
    Case(
        "trainable HLLM under ZeRO-3",
        train("--model", "HLLM", "--item_pretrain_dir", "{tmp}/m", "--item_llm_trainable", "true")
        + ["--strategy", "deepspeed", "--stage", "3"],
        "--item_llm_trainable true: DeepSpeed ZeRO-3 does not train HLLM's item LLM correctly",
        lambda env: [
            write("m/config.json", '{"model_type": "llama"}')(env),
            env.monkeypatch.setattr("persrec.train.deepspeed_config.deepspeed_available", lambda: True),
        ],
    ),
    Case(
        "deepspeed_config without deepspeed",
        train("--deepspeed_config", "{tmp}/ds.json"),
        "--deepspeed_config is read by --strategy deepspeed",
        write("ds.json", "{}"),
    ),
    Case(
        "gradient_checkpointing not a bool",
        train("--gradient_checkpointing", "sometimes"),
        "--gradient_checkpointing: expected true or false",
    ),
    # ---- Hugging Face backbones ----
    Case(
        "hub id as a model directory",
        train("--model", "LLaMAID", "--user_pretrain_dir", "HuggingFaceTB/SmolLM2-135M"),
        "looks like a hub id, but persrec loads models only from local directories",
    ),
    Case(
        "model directory without config.json",
        train("--model", "LLaMAID", "--user_pretrain_dir", "{tmp}/empty"),
        "--user_pretrain_dir {tmp}/empty: the directory has no config.json",
        write("empty/README", "nothing here"),
    ),
    Case(
        "pickled weights only",
        train("--model", "LLaMAID", "--user_pretrain_dir", "{tmp}/pickled"),
        "holds only pickled .bin weights",
        lambda env: [
            write("pickled/config.json", '{"model_type": "llama"}')(env),
            write("pickled/pytorch_model.bin", b"not unpickled")(env),
        ],
    ),
    Case(
        "HSTU kernel for a Hugging Face model",
        train("--model", "LLaMAID", "--attention_implementation", "native"),
        "--attention_implementation: expected one of auto, sdpa, eager",
    ),
    Case(
        "Hugging Face kernel for HSTU",
        train("--attention_implementation", "sdpa"),
        "--attention_implementation: expected one of auto, native, tiled, reference",
    ),
    Case(
        "model directory for an ID model",
        train("--user_pretrain_dir", "{tmp}"),
        "--user_pretrain_dir is read by the LLaMAID and HLLM models only",
    ),
    Case("HLLM without an item model", train("--model", "HLLM"), "--model HLLM needs --item_pretrain_dir"),
    Case(
        "HLLM text length",
        train("--model", "HLLM", "--item_pretrain_dir", "{tmp}/m", "--MAX_TEXT_LENGTH", "0"),
        "--MAX_TEXT_LENGTH",
        write("m/config.json", '{"model_type": "llama"}'),
    ),
    # ---- resume ----
    Case(
        "resume changes the model",
        ["train", "--resume", "{tmp}/run", "--n_layers", "3"],
        "--n_layers 3 differs from the resumed run's 1",
        trained_run(),
    ),
    Case(
        "resume changes the learning rate",
        ["train", "--resume", "{tmp}/run", "--optim_args.learning_rate", "0.5"],
        "--optim_args.learning_rate",
        trained_run(),
    ),
    Case("resume nothing there", ["train", "--resume", "{tmp}/none"], "no complete checkpoint found"),
    Case(
        "resume a run name with no run",
        ["train", "--resume", "true", "--run_name", "ghost", "--checkpoint_dir", "{tmp}"],
        "--resume true: no complete checkpoint found",
    ),
    Case(
        "resume pickled code",
        ["train", "--resume", "{tmp}/run", "--epochs", "2"],
        "optimizer.pt is not a checkpoint file persrec can load safely",
        trained_run("payload"),
    ),
    Case(
        "evaluate on another dataset",
        ["evaluate", "{tmp}/run", "--dataset", "{tmp}/other"],
        "pass --allow_dataset_mismatch true",
        trained_run("other dataset"),
    ),
    # ---- data files and outputs ----
    Case(
        "convert onto its input",
        ["convert", "{tmp}/a.csv", "{tmp}/a.csv", "--overwrite"],
        "is the input file itself",
        write("a.csv", "user_id,item_id,timestamp\n1,2,3\n"),
    ),
    Case(
        "convert over an existing output",
        ["convert", "{tmp}/a.csv", "{tmp}/b.parquet"],
        "b.parquet: already exists; pass --overwrite",
        lambda env: (write("a.csv", "user_id,item_id,timestamp\n1,2,3\n")(env), write("b.parquet", "x")(env)),
    ),
    Case(
        "prepare over a user's directory",
        ["prepare", "--input", "{tmp}/in.parquet", "--output", "{tmp}/mine", "--overwrite"],
        "is not a prepared dataset written by persrec",
        lambda env: (tiny_parquet("in.parquet")(env), write("mine/manifest.json", "{}")(env)),
    ),
    Case(
        "prepare a damaged parquet",
        ["prepare", "--input", "{tmp}/in.parquet", "--output", "{tmp}/out"],
        "in.parquet: not a readable parquet file",
        tiny_parquet("in.parquet", damage=True),
    ),
    Case(
        "prepare a text file as parquet",
        ["prepare", "--input", "{tmp}/in.parquet", "--output", "{tmp}/out"],
        "not a readable parquet file",
        write("in.parquet", "user_id,item_id\n1,2\n"),
    ),
    Case(
        "convert unknown encoding",
        ["convert", "{tmp}/a.csv", "{tmp}/b.parquet", "--encoding", "bogus"],
        "--encoding 'bogus': unknown encoding",
        write("a.csv", "user_id,item_id,timestamp\n1,2,3\n"),
    ),
    # ---- commands and their own options ----
    Case("unknown command", ["foo"], "unknown command 'foo'"),
    Case("command typo", ["evalute", "{tmp}"], "did you mean 'evaluate'?"),
    Case(
        "prepare no options", ["prepare"], "prepare: the following arguments are required: --input, --output"
    ),
    Case(
        "prepare int option",
        ["prepare", "--input", "{tmp}/a", "--output", "{tmp}/b", "--min_user_interactions", "x"],
        "--min_user_interactions: invalid int value",
    ),
    Case(
        "prepare unknown option",
        ["prepare", "--input", "{tmp}/a", "--output", "{tmp}/b", "--inptu", "x"],
        "unrecognized arguments: --inptu",
    ),
    Case(
        "convert one path",
        ["convert", "{tmp}/a.csv"],
        "convert: the following arguments are required: output",
    ),
    Case(
        "prepare unknown format",
        prepare_format("movielens-20m"),
        "--format 'movielens-20m': expected one of amazon-reviews, ebnerd, merrec, movielens, pixelrec",
    ),
    Case("prepare format no input", prepare_format("ebnerd"), "--input {tmp}/in: no such file or directory"),
    Case(
        "ebnerd given other parquet",
        prepare_format("ebnerd"),
        "missing column(s) article_id_fixed, impression_time_fixed; an EB-NeRD history.parquet needs",
        raw_files({"in/history.parquet": {"user_id": [1], "item_id": [2], "timestamp": [3]}}),
    ),
    Case(
        "merrec given ebnerd history",
        prepare_format("merrec"),
        "missing column(s) product_id, event_id, stime; a MerRec event file",
        raw_files({"in/history.parquet": {"user_id": [1], "article_id_fixed": [[2]]}}),
    ),
    Case(
        "merrec unknown event",
        prepare_format("merrec", "--events", "item_view,click"),
        "--events: unknown MerRec event type(s) click",
        raw_files({"in/a.parquet": {"user_id": [1]}}),
    ),
    Case(
        "ebnerd bool option",
        prepare_format("ebnerd", "--behaviors", "maybe"),
        "argument --behaviors: expected true or false, got 'maybe'",
    ),
    Case(
        "amazon ratings with a header",
        prepare_format("amazon-reviews"),
        "is not user,item,rating,timestamp (Amazon 2014 rating files have no header",
        raw_files({"in/ratings_Toys.csv": "user,item,rating,timestamp\nA,B,5.0,1\n"}),
    ),
    Case(
        "amazon meta with code",
        prepare_format("amazon-reviews"),
        "meta_Toys.json.gz:1: not a JSON object or a Python literal dict",
        raw_files(
            {
                "in/ratings_Toys.csv": "A,B,5.0,1\n",
                "in/meta_Toys.json.gz": "__import__('os').system('touch ran')\n",
            }
        ),
    ),
    Case(
        "amazon bad rating deep in the file",
        prepare_format("amazon-reviews"),
        "ratings_Toys.csv: cannot read it (Conversion Error: CSV Error on Line: 4 Original Line: A,E,x,2",
        raw_files({"in/ratings_Toys.csv": "A,B,5.0,1\nA,C,4.0,2\nA,D,4.0,2\nA,E,x,2\n"}),
    ),
    Case(
        "pixelrec given movielens ratings",
        prepare_format("pixelrec"),
        "missing column(s) item_id, user_id; a PixelRec interaction CSV (with header) needs",
        raw_files({"in/dataset/Pixel200K.csv": "userId,movieId,rating,timestamp\n1,2,3.0,4\n"}),
    ),
    Case(
        "movielens without its files",
        prepare_format("movielens"),
        "movielens expects ratings.csv + movies.csv",
        raw_files({"in/ratings.dat": "1::2::3::4\n"}),
    ),
    Case(
        "dataset ebnerd without data_path", train("--dataset", "ebnerd"), "--dataset ebnerd needs --data_path"
    ),
    Case("stats of a folder", ["stats", "{tmp}"], "not a prepared dataset"),
    Case(
        "stats plot not png",
        ["stats", "{data}", "--plot", "{tmp}/h.jpg"],
        "--plot {tmp}/h.jpg: expected a .png",
    ),
    # ---- persrec models ----
    Case("models no action", ["models"], "models: the following arguments are required: action"),
    Case(
        "models unknown name",
        ["models", "convert", "no-such-model", "--output", "{tmp}/out"],
        "models convert no-such-model: no local model of that name",
    ),
    Case(
        "models output not ours",
        ["models", "convert", "m", "--output", "{tmp}/keep", "--overwrite"],
        "--output {tmp}/keep: exists and was not written by persrec models convert",
        lambda env: (
            write("models/m/config.json", '{"model_type": "llama"}')(env),
            write("keep/notes.txt", "mine")(env),
            env.monkeypatch.setenv("PERSREC_MODELS_DIR", str(env.tmp / "models")),
        ),
    ),
]


def test_case_names_are_unique() -> None:
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_mistake_is_one_line_and_exit_2(
    case: Case,
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case.setup is not None:
        case.setup(Env(tmp_path, tiny_dataset, monkeypatch))
    before = sorted(tmp_path.rglob("*"))
    argv = [arg.replace("{tmp}", str(tmp_path)).replace("{data}", str(tiny_dataset)) for arg in case.argv]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse, were it to exit on its own
        code = exit_.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("persrec: "), err
    assert case.expect.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert sorted(tmp_path.rglob("*")) == before, "files were created under checkpoint_dir"
    assert not (tmp_path / "ran").exists(), "a checkpoint file ran code"
