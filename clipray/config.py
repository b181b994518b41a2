"""Typed configuration for every clipray command.

One root schema (`Config`) of dataclass sections, merged with YAML files and `key=value`
overrides by OmegaConf structured configs. Unknown keys and wrong types fail at start-up with
the key and the file named. Functions take the section they need (`DataConfig`, `ModelConfig`,
...), never the whole tree.

A YAML file may name a parent with `extends: other.yaml` (relative to itself); the child's keys
win. That keeps the paper recipes (MSR-VTT, MSVD, ...) to a few lines each.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

T = TypeVar("T")
# what a merge raises for a value of the wrong shape: OmegaConf's own errors, and a TypeError
# ("Cannot merge incompatible container types") for a mapping given to a list or the reverse
MERGE_ERRORS = (OmegaConfBaseException, TypeError, ValueError)


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and the source."""


class RunFailed(RuntimeError):
    """A run that started failed on its cluster: the cause in one line (exit status 1), where
    Ray's traceback of it ran to a hundred lines."""


@dataclass
class VideoConfig:
    backend: str = "decord"  # decord | pyav
    fps: float = 1.0  # candidate frames per second over [start, end]
    max_frames: int = 12
    slice: str = "uniform"  # head | tail | uniform, when more candidates than max_frames
    size: int = 224  # shorter side resized to this, then centre crop size x size (train, edit, index, serve: the model's)
    timeout_s: float = 60.0  # one file's decode is abandoned (and reported) after this


SAMPLING = ("fps", "max_frames", "slice")  # the video.* keys that choose a clip's frames (the size is the model's)


@dataclass
class DataConfig:
    manifest: str = ""  # Parquet file, directory of shards, or s3:// / gs:// URI
    split: str = "train"
    video: VideoConfig = field(default_factory=VideoConfig)
    video_root: str = ""  # prefix for relative paths in the manifest (default: manifest's dir)
    tokenizer: str = "ViT-B-32"  # open_clip model name whose tokenizer is used (training: the model's)
    max_words: int = 32
    batch_size: int = 32  # per training worker
    # how decoders run: "tasks" start at once on warm worker processes (short epochs, laptops,
    # tests); "actors" keep each decoder fed between calls (long epochs, streaming, decode nodes).
    # docs/benchmarks.md, "Decode tasks or decode actors"
    decode_pool: str = "tasks"
    decode_actors: int = 2  # decoders at once: tasks or actors, per `decode_pool`
    decode_cpus: float = 1.0  # logical CPUs reserved per decoder
    decode_batch: int = 4  # manifest rows per map_batches call
    # Training order. Manifests list a video's captions together (MSR-VTT: 20 in a row), and a
    # batch with two captions of one video scores one of them as a negative. shuffle_rows
    # shuffles the training split's manifest rows before decoding (Ray Data random_shuffle of
    # the small rows, not of frames): a new order every epoch, or every pass of a shard with
    # shard_stream. shuffle_buffer > 0 adds a local buffer of that many decoded clips on each
    # training worker (memory: rows x frames x 3 x size x size bytes); 0 = none.
    shuffle_rows: bool = False
    shuffle_buffer: int = 0
    # the order of each training clip's frames (specs/clip4clip.md): ordinal, reverse, or a new
    # random order per clip and step; padding stays at the end. Evaluation, the index and
    # serving read frames in order, as the reference evaluates
    train_frame_order: str = "ordinal"
    eval_manifest: str = ""  # held-out manifest for evaluation (default: data.manifest)
    eval_split: str = "test"  # the split of the eval manifest that training evaluates on
    # Huge sharded manifests (HowTo100M): each training worker streams its own shard files, one
    # at a time in a seeded order, and checkpoints record the shards consumed, so a restart
    # never reads them again in the same pass. Needs train.max_steps.
    shard_stream: bool = False


@dataclass
class ModelConfig:
    name: str = "test_meanP"  # a registered name, see `clipray.list_models()`
    pretrained: Optional[str] = None  # open_clip pretrained tag or a local checkpoint path
    head: Optional[str] = None  # override: meanP | seqLSTM | seqTransf | tightTransf
    linear_patch: Optional[str] = None  # override: 2d | 3d
    tuning: Optional[str] = None  # override: full | frozen | unipt (clipray/models/tuning.py)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # new modules (temporal head, cross encoder, 3d conv, side network)
    coef_lr: float = 1e-3  # backbone lr = lr * coef_lr
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    run_name: str = "clipray"
    storage_path: str = "runs"  # local directory or s3:// URI
    epochs: int = 5
    max_steps: int = 0  # >0: a step budget instead of epochs x dataset length
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    grad_accum: int = 1
    # >0: the batch a recipe's contrastive loss was tuned on (data.batch_size x num_workers), checked
    # at load: on fewer GPUs a recipe trained at a smaller batch (fewer negatives) without a word
    global_batch: int = 0
    activation_checkpointing: bool = False
    eval_every_epochs: int = 1  # evaluate every N epochs and after the last (N >= epochs: last only)
    # evaluation also ranks with dual softmax (specs/clip4clip.md) and reports it apart, as dsl_t2v_r1 ...:
    # transductive (it reweighs each score by all the queries at once), so off by default; loose heads only
    eval_dsl: bool = False
    checkpoint_every_steps: int = 0  # with max_steps: checkpoint (and evaluate) every N steps
    max_failures: int = 0
    seed: int = 42


@dataclass
class EditConfig:
    """Clip-boundary editing from single timestamps (`clipray edit`, train/edit.py)."""
    init: str = "midpoint"  # midpoint | window: how stage 1 turns timestamps into clips
    window_s: float = 0.0  # init=window: the clip's width, centred on the timestamp
    max_width_s: float = 0.0  # >0: no initial clip wider than this (shrunk towards its timestamp)
    min_width_s: float = 1.0  # no clip, initial or edited, shorter than this (>= 1 ms: clips keep ms)
    warmup_epochs: int = 2  # stage 2: epochs on the initial clips; the teacher is this student
    rounds: int = 3  # stage 3: (edit if the teacher changed) + train + validate, this many times
    epochs_per_round: int = 1
    step_s: float = 1.0  # a boundary moves by multiples of this
    max_steps: int = 2  # start and end each move by up to this many steps per edit
    margin: float = 0.0  # a candidate replaces a clip when its score beats the clip's by more
    val_split: str = "val"  # the student is validated on this split after every round
    test_split: str = "test"  # the final student is evaluated on this split (ground-truth clips)
    actors: int = 2  # teacher scoring job: Ray Data actor pool
    actor_cpus: float = 1.0
    actor_gpus: float = -1.0  # -1: one GPU per actor when the cluster has GPUs, else 0
    batch: int = 8  # captions per scoring call


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else an embedded local Ray (also: "local")
    num_cpus: Optional[int] = None  # logical CPUs of the embedded Ray (default: 2 x cores, at least 4)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    edit: EditConfig = field(default_factory=EditConfig)


# What each value must be, checked after every merge (OmegaConf checks only the types), so a
# zero batch or a misspelt backend fails at start-up rather than as a ZeroDivisionError or with
# every clip skipped. A rule is (test, what it says); None always passes (an unset Optional).
SPLITS = ("train", "val", "test")  # a manifest row's split (clipray.manifest imports it from here)
DECODE_POOLS = ("tasks", "actors")  # data.decode_pool (clipray bench data --pools takes them too)
FRAME_ORDERS = ("ordinal", "reverse", "random")  # data.train_frame_order


def at_least(lo: float) -> tuple[Any, str]:
    return (lambda v: v >= lo), f">= {lo}"


def positive() -> tuple[Any, str]:
    return (lambda v: v > 0), "> 0"


def _in_steps(v: float) -> bool:
    """Ray counts a fractional CPU or GPU to 0.0001: a finer one (0.00001) was its ValueError
    traceback once the actor, task or replica was made, after Ray had started."""
    return abs(v * 10_000 - round(v * 10_000)) < 1e-6


def resource(strict: bool = False) -> tuple[Any, str]:
    """A CPU or GPU count, as Ray takes it: >= 0 (> 0 when strict), in steps of 0.0001."""
    return ((lambda v: (v > 0 if strict else v >= 0) and _in_steps(v)),
            f"{'>' if strict else '>='} 0, in steps of 0.0001 (Ray's)")


def _whole_ms() -> tuple[Any, str]:
    # clip times are kept to the millisecond: a finer step would round to no move or drift
    return (lambda v: v >= 0.001 and abs(v * 1000 - round(v * 1000)) < 1e-6), "a whole number of milliseconds, >= 0.001"


def one_of(*choices: Any) -> tuple[Any, str]:
    return (lambda v: v in choices), f"one of {', '.join(map(str, choices))}"


# an actor pool's GPUs per actor: NaN was a traceback once the pool started, after a clip
# editing warm-up; -7 was taken as -1 without a word
GPUS_PER_ACTOR = ((lambda v: v == -1 or (v >= 0 and _in_steps(v))),
                  "-1 (one per actor where the cluster has GPUs) or >= 0, in steps of 0.0001 (Ray's)")


# a candidate rate past any video's frame rate adds no frame, but its times are counted out one
# by one: data.video.fps=1e9 filled memory in every decode task (a 2 s clip: 16 GB), once Ray was up
MAX_FPS = 1000


RULES: dict[type, dict[str, tuple[Any, str]]] = {
    VideoConfig: dict(backend=one_of("decord", "pyav"),
                      fps=((lambda v: 0 < v <= MAX_FPS), f"> 0 and at most {MAX_FPS} (frames per second)"),
                      max_frames=at_least(1),
                      slice=one_of("head", "tail", "uniform"), size=at_least(1), timeout_s=positive()),
    # max_words: the start and end-of-text tokens and a word; at 2 every caption was those two tokens
    DataConfig: dict(split=one_of(*SPLITS), eval_split=one_of(*SPLITS), max_words=at_least(3),
                     batch_size=at_least(1), decode_pool=one_of(*DECODE_POOLS), decode_actors=at_least(1),
                     decode_cpus=resource(strict=True), decode_batch=at_least(1),
                     shuffle_buffer=at_least(0), train_frame_order=one_of(*FRAME_ORDERS)),
    OptimConfig: dict(lr=positive(), coef_lr=at_least(0), weight_decay=at_least(0), eps=positive(),
                      warmup_ratio=((lambda v: 0 <= v < 1), "in [0, 1)"), grad_clip=at_least(0),
                      # else AdamW's ValueError in every training worker, once Ray is up
                      betas=((lambda v: all(0 <= b < 1 for b in v)), "two numbers in [0, 1)")),
    TrainConfig: dict(epochs=at_least(1), max_steps=at_least(0), num_workers=at_least(1),
                      cpus_per_worker=resource(), zero_stage=one_of(0, 1, 2, 3),
                      precision=one_of("auto", "fp32", "bf16"),
                      grad_accum=at_least(1), global_batch=at_least(0), eval_every_epochs=at_least(1),
                      checkpoint_every_steps=at_least(0), max_failures=at_least(-1),
                      # numpy (Ray Data's local shuffle) refuses a negative seed, and torch one past
                      # 64 bits (a traceback in every worker); the loop adds steps and ranks to it
                      seed=((lambda v: 0 <= v < 2 ** 32), "in [0, 2**32)"),
                      # empty (an unset ${oc.env:...}) trained into the current folder, and s3://
                      # with no bucket into a local folder ./s3:, and s3:/bucket (one slash) into
                      # ./s3:/bucket, each without a word
                      storage_path=((lambda v: bool(v.strip()) and not v.strip().rstrip("/").endswith(":")
                                     and not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/(?!/)", v.strip())),
                                    "a folder, or a URI with its bucket (s3://BUCKET/runs)")),
    # anything else reached ray.init: "Invalid address format" traceback, the run folder made
    RayConfig: dict(num_cpus=at_least(1),
                    # (a URI goes on to runtime's checks: a job server's http:// address is said so;
                    # ray:// with no host waited 30 s in Ray Client, then a ConnectionError traceback)
                    address=((lambda v: v.strip() in ("", "auto", "local")
                              or ("://" in v and not re.fullmatch(r"(?i)ray://(:\d*)?/?", v.strip()))
                              or re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}", v.strip()) is not None),
                             "host:port (a cluster's head, e.g. 10.0.0.5:6379), ray://host:port, auto or local")),
    EditConfig: dict(init=one_of("midpoint", "window"), window_s=at_least(0), max_width_s=at_least(0),
                     min_width_s=at_least(0.001), warmup_epochs=at_least(1), rounds=at_least(0),
                     epochs_per_round=at_least(1), step_s=_whole_ms(), max_steps=at_least(1), margin=at_least(0),
                     val_split=one_of(*SPLITS), test_split=one_of(*SPLITS),
                     actors=at_least(1), actor_cpus=resource(strict=True), actor_gpus=GPUS_PER_ACTOR, batch=at_least(1)),
}


UNBOUNDED = {"timeout_s"}  # `inf` is no limit (clipray.video); every other ruled number must be finite


def bad_value(cfg: Any, prefix: str = "") -> Optional[tuple[str, str]]:
    """The first (key, what is wrong) that breaks RULES in a loaded config of any schema."""
    rules = RULES.get(type(cfg), {})
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            bad = bad_value(value, key + ".")
            if bad:
                return bad
        elif (f.name in rules and isinstance(value, float) and not math.isfinite(value)
              and not (f.name in UNBOUNDED and value > 0)):
            # `data.video.fps=inf` passed `> 0` and divided by zero in every clip's decode
            return key, f"must be a finite number, got {value!r}"
        elif f.name in rules and value is not None and not _passes(rules[f.name][0], value):
            return key, f"must be {rules[f.name][1]}, got {value!r}"
    return None


def _passes(test: Any, value: Any) -> bool:
    try:
        return bool(test(value))
    except TypeError:  # `optim.betas=[[1],2]`: OmegaConf leaves a tuple's items unchecked
        return False


def _yaml_problem(e: Exception) -> str:
    """A YAML error in one line: PyYAML's message spreads over four, naming the file twice."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark:
        m, c = e.problem_mark, e.context_mark
        context = f" ({e.context} at line {c.line + 1})" if e.context and c else ""
        return f"line {m.line + 1}, column {m.column + 1}: {e.problem}{context}"
    return " ".join(str(e).split())


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, Any]]:
    """Load a YAML file and the files it `extends:`, as (file, keys) pairs, the farthest parent
    first: each file's keys override those before it, and a mistake names the file it is in.
    A parent is named relative to the file given (`train/configs/clip4clip_vitb32.yaml`)."""
    name, path = str(path), path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'extends'")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        node = OmegaConf.load(path)
    except GrammarParseError as e:  # YAML, but an unclosed ${ in a value
        key = getattr(e, "full_key", None) or "a value"
        raise ConfigError(f"{path}: {key} is no interpolation ({str(e).splitlines()[0]}); for a text, "
                          "write each ${ as \\${") from e
    except Exception as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
    if not OmegaConf.is_dict(node):  # a list, or a file that is not YAML keys at all
        raise ConfigError(f"{path}: a config file holds `key: value` lines; this one reads as a "
                          f"{type(OmegaConf.to_container(node)).__name__}")
    parent = node.pop("extends", None)
    if parent is None:
        return [(name, node)]
    if not isinstance(parent, str) or not parent.strip():  # a list, a number, an empty text
        given = OmegaConf.to_container(parent) if OmegaConf.is_config(parent) else parent
        raise ConfigError(f"{path}: bad key 'extends': names one YAML file (relative to this one), got {given!r}")
    try:
        return _read_yaml(Path(name).parent / parent, seen + (path,)) + [(name, node)]
    except ConfigError as e:  # the parent is missing: say which file names it, and how
        if str(e).startswith("config file not found: "):
            raise ConfigError(f"{path}: bad key 'extends: {parent}': {e}") from None
        raise


def _merge(base: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except MERGE_ERRORS as e:
        key, msg = str(getattr(e, "full_key", None) or ""), str(e).splitlines()[0]
        if not key and (clash := _section_given_a_value(base, other)):
            key, sub = clash
            msg = (f"a section, not a value: set its keys instead ({', '.join(f'{key}.{k}' for k in sub[:4])}"
                   + (f", ... {len(sub)} in all)" if len(sub) > 4 else ")") if sub
                   else f"a mapping, not a value: set its keys instead ({key}.NAME=value)")
        elif not key and (found := _unnamed_bad_key(base, other)):
            key, msg = found
        key = key or "?"
        if len(key) > 60:  # a file that is not YAML keys reads as one long key: not all of it twice
            msg, key = msg.replace(key, key[:57] + "..."), key[:57] + "..."
        raise ConfigError(f"{source}: bad key '{key}': {msg}") from e


def _section_given_a_value(base: Any, other: Any, prefix: str = "") -> tuple[str, list[str]] | None:
    """The first key that is a section in `base` but a plain value in `other` (`index=/x` where
    `index.out=/x` was meant), with the section's keys; OmegaConf's error names no key for it."""
    for k in other:
        if k not in base:
            continue
        key, b, o = f"{prefix}{k}", base._get_node(k), other._get_node(k)
        if not OmegaConf.is_dict(b):
            continue
        if not OmegaConf.is_dict(o):
            return key, [str(x) for x in b]
        if found := _section_given_a_value(b, o, key + "."):
            return found
    return None


def _unnamed_bad_key(base: Any, other: Any, prefix: str = "") -> tuple[str, str] | None:
    """The first key of `other` that does not merge onto `base`, and why, for the errors OmegaConf
    raises naming no key (`optim.betas=[0.9]`: a list of the wrong length for a tuple)."""
    for k in other:
        key, o = f"{prefix}{k}", other._get_node(k)
        b = base._get_node(k) if k in base else None
        if OmegaConf.is_dict(b) and OmegaConf.is_dict(o):
            if found := _unnamed_bad_key(b, o, key + "."):
                return found
            continue
        try:
            OmegaConf.merge(base, {k: o})
        except MERGE_ERRORS as e:
            hint = b._metadata.ref_type if b is not None else None
            types = get_args(hint)
            if get_origin(hint) is tuple and types and Ellipsis not in types:
                value = OmegaConf.to_container(o) if OmegaConf.is_config(o) else o._value()
                return key, (f"must be a list of {len(types)} values "
                             f"({', '.join(getattr(t, '__name__', str(t)) for t in types)}), got {value!r}")
            return key, str(e).splitlines()[0]
    return None


def _failing_interpolation(node: Any, prefix: str = "") -> Optional[str]:
    """The dotted key of the first `${...}` in `node` that does not resolve where it stands."""
    for k in node:
        key = f"{prefix}{k}"
        if OmegaConf.is_interpolation(node, k):
            try:
                node[k]
            except OmegaConfBaseException:
                return key
        elif OmegaConf.is_dict(child := node._get_node(k)):
            found = _failing_interpolation(child, key + ".")
            if found:
                return found
    return None


def _source_of(key: str, sources: Sequence[tuple[str, Any]]) -> Optional[str]:
    """The last source (file or overrides) that sets the dotted `key`, or None."""
    for name, node in reversed(sources):
        for part in key.split("."):
            node = node._get_node(part) if OmegaConf.is_dict(node) and part in node else None
            if node is None:
                break
        else:
            return name
    return None


def _value_as_given(cfg: Any, override: str, source: str = "command-line override") -> str:
    """`key=value` with the value quoted where `key` is a text field and YAML would read the
    value as anything but that text: a number or a boolean (`train.run_name=0612` became the
    run "394", YAML 1.1 octal; `=007` "7", `=1:30` "90", `=yes` "True"), a comment
    (`train.run_name=ablation #2` became "ablation", the run folder of `ablation #1` too;
    `clipray demo --runs 'runs #2'` wrote to `runs`), a mapping (`a: b` in a path),
    or no YAML at all (`data.manifest=*.parquet`). A value quoted by the user, null (an
    Optional's unset) and interpolations stay as YAML and OmegaConf read them. A number key
    reads a leading zero as decimal, and a boolean key refuses a whole number but 0 and 1
    (`source` names where the value was given)."""
    key, _, value = override.partition("=")
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not OmegaConf.is_dict(node):
            return override
        if part not in node:  # a new key of a mapping of texts (serve.*.env_vars.NAME=true) is text
            if i == len(parts) - 1 and node._metadata.element_type is str:
                break
            return override
        node = node._get_node(part)
    else:
        given = value.strip()
        if isinstance(node, (IntegerNode, FloatNode)) and re.fullmatch(r"[+-]?0[0-9]+", given):
            return f"{key}={int(given)}"  # YAML 1.1 reads a leading 0 as octal: train.epochs=010 was 8
        if isinstance(node, BooleanNode) and re.fullmatch(r"[+-]?[0-9]+", given) and int(given) not in (0, 1):
            # OmegaConf took any other whole number as true: train.use_gpu=2 (or -1) trained on GPUs
            raise ConfigError(f"{source}: {key} must be true or false, got {given}")
        if not isinstance(node, StringNode):
            return override
    try:
        read = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]), resolve=False)["v"]
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError, AttributeError, KeyError):
        read = ...  # not YAML (or a YAML tag PyYAML cannot build: `!!float x`): the text it is
    given = value.strip()  # as YAML strips a plain value
    quoted = len(given) >= 2 and given[0] in "'\"" and given[-1] == given[0]
    if (read is None and given in ("", "null", "Null", "NULL", "~")) or (
            isinstance(read, str) and (read == given or quoted)):
        return override
    return f"{key}='{value.replace(chr(39), chr(39) * 2)}'"


def _plain_scalars(node: yaml.Node, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value as written) of each unquoted scalar value in a YAML mapping."""
    found: list[tuple[str, str]] = []
    for k, v in node.value if isinstance(node, yaml.MappingNode) else ():
        key = f"{prefix}{k.value}"
        if isinstance(v, yaml.ScalarNode) and v.style is None:
            found.append((key, v.value))
        elif isinstance(v, yaml.MappingNode):
            found += _plain_scalars(v, key + ".")
    return found


def _file_as_written(cfg: Any, node: Any, name: str) -> Any:
    """A config file's keys read by the rules of an override's value (`_value_as_given`): a
    text key keeps the text written (`run_name: 0612` was the run "394", `1:30` "90", `yes`
    "True"), a number key reads a leading zero as decimal (`epochs: 010` trained 8 epochs) and a
    true/false key refuses a whole number but 0 and 1. Quoted values, null and `${...}` stay
    as YAML reads them."""
    fixes = []
    for key, raw in _plain_scalars(yaml.compose(Path(name).read_text())):
        given = f"{key}={raw}"
        fixed = _value_as_given(cfg, given, name)
        if fixed != given:
            fixes.append(fixed)
    return OmegaConf.merge(node, OmegaConf.from_dotlist(fixes)) if fixes else node


def _from_dotlist(overrides: Sequence[str], given: Sequence[str]) -> Any:
    """The overrides (`given`, as `_value_as_given` wrote them) as one config; a value that is
    not YAML for a key that is no text (which `_value_as_given` quoted): `train.epochs=*3` (`*`
    starts a YAML alias), `@3`, an unclosed bracket `optim.betas=[0.9, 0.98`, names its
    override as given in one line. An unclosed `${` is OmegaConf's: `\\${` is the text."""
    for o, as_given in zip(overrides, given):
        try:
            OmegaConf.from_dotlist([o])
        # (PyYAML builds a tagged value itself: `!!float x` is its ValueError, `!!timestamp x`
        # an AttributeError, `!!bool x` a KeyError, each a traceback)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError, AttributeError, KeyError) as e:
            key, _, value = as_given.partition("=")
            why = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
            if isinstance(e, GrammarParseError):  # its advice to quote failed again, quoted
                raise ConfigError(f"command-line override: bad key '{key}': the value {value!r} is no "
                                  f"interpolation ({why}); for a text, write each ${{ as \\${{") from e
            raise ConfigError(f"command-line override: bad key '{key}': the value {value!r} does not read as "
                              f"YAML ({why}); quote a text value: \"{key}='{value}'\"") from e
    return OmegaConf.from_dotlist(list(overrides))


SOURCE_ROOT = Path(__file__).resolve().parents[1]  # holds train/ and serve/ with their configs


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    schema: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Schema defaults <- YAML file (with `extends`) <- `key=value` overrides -> dataclass."""
    cfg = OmegaConf.structured(schema)
    if path is not None and "://" in str(path):  # Path() would fold it into a local s3:/b/c.yaml
        raise ConfigError(f"{path}: a config file is read from a local path, not a URI (copy it here; "
                          "a Ray job ships its working_dir)")
    if path is not None and not Path(path).exists() and not Path(path).is_absolute() \
            and (ours := SOURCE_ROOT / path).is_file():
        # `clipray train train/configs/demo.yaml` from another folder: the file is read from the
        # working folder, as a Ray job reads its own working_dir's copy; a silent fallback to
        # clipray's copy would train other settings than a user's edited file. Point at it instead.
        raise ConfigError(f"config file not found: {Path(path).resolve()} (a relative path is read from "
                          f"the current folder; clipray's own copy is {ours})")
    sources = _read_yaml(Path(path)) if path is not None else []
    for i, (name, node) in enumerate(sources):  # one file at a time: a mistake in a parent names it
        sources[i] = (name, node := _file_as_written(cfg, node, name))
        cfg = _merge(cfg, node, name)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    if overrides:
        # `key=` reads as null, which a text field refuses ("Incompatible value 'None'"): give
        # such a field the empty text, so the command's own check says what it needs
        given = overrides
        overrides = [f"{o}''" if o.endswith("=") and o.count("=") == 1
                     and isinstance(OmegaConf.select(cfg, o[:-1], default=None), str)
                     else _value_as_given(cfg, o) for o in overrides]
        dotlist = _from_dotlist(overrides, given)
        cfg = _merge(cfg, dotlist, "command-line override")
        sources.append(("command-line override", dotlist))
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve: `${oops}`
        # (one whose value cannot go where it stands names no key: `optim.betas=${oc.env:X}` of a
        # text blamed the config file, over three lines)
        key = str(getattr(e, "full_key", None) or "") or _failing_interpolation(cfg) or ""
        source = _source_of(key, sources) if key else None
        raise ConfigError(f"{source}: {key}: {str(e).splitlines()[0]}" if source
                          else f"{path or 'defaults'}: {e}") from e
    said = _bad_boolean(cfg, sources)
    if said:
        raise ConfigError(said)
    bad = bad_value(obj)
    if bad:
        raise ConfigError(f"{_source_of(bad[0], sources) or path or 'defaults'}: {bad[0]} {bad[1]}")
    if isinstance(obj, Config) and (said := batch_mismatch(obj)):
        raise ConfigError(f"{_source_of('train.global_batch', sources) or path}: {said}")
    return _absolute_paths(obj) if isinstance(obj, Config) else obj  # type: ignore[return-value]


def batch_mismatch(cfg: Config) -> Optional[str]:
    """What is wrong when `train.global_batch` is set and the batch per step differs from it."""
    g, b, w = cfg.train.global_batch, cfg.data.batch_size, cfg.train.num_workers
    if not g or b * w == g:
        return None
    fix = f"data.batch_size={g // w}" if g % w == 0 else f"a data.batch_size x train.num_workers of {g}"
    return (f"train.global_batch is {g}, but data.batch_size={b} x train.num_workers={w} is {b * w}: the "
            f"contrastive loss scores each caption against that batch's clips, so the recipe's results need "
            f"its batch. Give {fix}, or train.global_batch=0 to train at {b * w} (and to resume a run "
            "begun at it; train.grad_accum adds steps, not negatives)")


BOOLEAN_TEXTS = ("true", "false", "yes", "no", "on", "off", "y", "n", "0", "1")


def _bad_boolean(cfg: Any, sources: Sequence[tuple[str, Any]], whole: Any = None, prefix: str = "") -> Optional[str]:
    """A true/false key given a number but 0 and 1 in a form `_value_as_given` does not see: as
    a quoted text (`train.use_gpu="2"`, `use_gpu: '2'` in a file) or through an interpolation
    (`${oc.env:GPUS}`). OmegaConf took each for true: a run on GPUs nobody asked for."""
    whole = cfg if whole is None else whole
    for k in cfg:
        key, node = f"{prefix}{k}", cfg._get_node(k)
        if OmegaConf.is_dict(node):
            said = _bad_boolean(node, sources, whole, key + ".")
            if said:
                return said
            continue
        source = _source_of(key, sources) if isinstance(node, BooleanNode) else None
        if source is None:
            continue
        raw = dict(sources)[source]  # the value as that source gave it, before OmegaConf's bool()
        for part in key.split("."):
            raw = raw._get_node(part)
        raw = raw._value()
        if isinstance(raw, str) and "${" in raw:  # resolved as text, with every key it may name
            untyped = OmegaConf.create(OmegaConf.to_container(whole, resolve=False))
            raw = OmegaConf.select(untyped, key)
        ok = isinstance(raw, bool) or raw in (0, 1) or (isinstance(raw, str) and raw.strip().lower() in BOOLEAN_TEXTS)
        if not ok:
            return f"{source}: {key} must be true or false, got {raw!r}"
    return None


def _absolute(path: str) -> str:
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def _absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute against the directory the command runs in: Ray Train
    workers run elsewhere, and a relative manifest would not be found there."""
    pre = cfg.model.pretrained
    local_weights = bool(pre) and not pre.startswith("hf-hub:") and ("/" in pre or Path(pre).expanduser().exists())
    if local_weights and "://" not in pre and not Path(_absolute(pre)).is_file():
        # here, not as a traceback from every training worker once Ray is up
        raise ConfigError(f"model.pretrained={pre}: no such file (give an open_clip tag such as "
                          "openai, or a local checkpoint file)")
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, manifest=_absolute(cfg.data.manifest),
                                      eval_manifest=_absolute(cfg.data.eval_manifest),
                                      video_root=_absolute(cfg.data.video_root)),
        model=dataclasses.replace(cfg.model, pretrained=_absolute(pre) if local_weights else pre),
        train=dataclasses.replace(cfg.train, storage_path=_absolute(cfg.train.storage_path)))


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, saved beside every run for reproducibility: `load_config`
    reads it back to the same config. A `${` in a value (given escaped, `\\${`, or from an
    environment variable) is written escaped, else it would read back as an interpolation."""
    def escaped(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: escaped(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [escaped(x) for x in v]
        # OmegaConf reads `\${` as a literal `${`, and n backslashes before it from 2n
        return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", v) if isinstance(v, str) else v
    return OmegaConf.to_yaml(OmegaConf.create(escaped(dataclasses.asdict(cfg))))


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
