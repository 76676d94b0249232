"""Where the teacher lives (tdrl.models.placement): device maps on the CPU give the annotation of no map,
a bad map is a ConfigError saying what to write, offloaded weights are refused, a half-precision teacher
annotates within a stated tolerance of float32."""

import pytest
import torch

from tdrl.errors import ConfigError
from tdrl.models import load_student, load_teacher
from tdrl.models.placement import check_in_memory, input_device, parse_device_map

PROMPTS = ["What is the capital of France?", "Name three colors of the rainbow.", "hi", "Explain: print(1)"]


@pytest.fixture(scope="module")
def batch():
    """Right-padded (prompt + tiny teacher response) token ids of PROMPTS, and their mask."""
    teacher = load_teacher("tiny")
    responses = teacher.generate(PROMPTS, 24, seed=0)
    seqs = [teacher.encode_prompt(p) + r for p, r in zip(PROMPTS, responses)]
    ids = torch.full((len(seqs), max(map(len, seqs))), teacher.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    """The tiny teacher as a save_pretrained directory: loaded through from_pretrained(device_map=...)."""
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    teacher = load_teacher("tiny")
    teacher.model.save_pretrained(path)
    teacher.tokenizer.save_pretrained(path)
    return str(path)


def same_annotation(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in [(a.subset.ids, b.subset.ids), (a.subset.logprobs, b.subset.logprobs)]
        + [(a.subset.mask, b.subset.mask), (a.token_logprob, b.token_logprob), (a.reward, b.reward)]
    )


def test_device_maps_on_the_cpu_annotate_exactly_as_no_map(batch, saved_teacher, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tdrl.data import annotate, load_annotations, load_source

    given, load = [], AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # the map reaches accelerate's big-model loading as given
        given.append(kwargs.get("device_map"))
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    ids, mask = batch
    mixed = {"transformer": "cpu", "lm_head": "cpu"}
    for name, maps in [
        ("tiny", ["cpu", {"": "cpu"}, '{"": "cpu"}', "auto", "sequential"]),
        (saved_teacher, ["cpu", '{"": "cpu"}', "auto", "balanced", mixed]),
    ]:
        plain = load_teacher(name)
        reference = plain.annotate(ids, mask, top_k=16, top_p=0.8, reward="inverse_soft_q")
        for device_map in maps:
            mapped = load_teacher(name, device_map=device_map)
            assert mapped.device == torch.device("cpu") and mapped.weights_fingerprint() == plain.weights_fingerprint()
            got = mapped.annotate(ids, mask, top_k=16, top_p=0.8, reward="inverse_soft_q")
            assert same_annotation(got, reference), (name, device_map)
        assert mapped.generate(PROMPTS[:2], 5, seed=1) == plain.generate(PROMPTS[:2], 5, seed=1)
    assert given == [None, "cpu", {"": "cpu"}, "auto", "balanced", mixed]  # the tiny teacher is built in memory
    # and a whole cache: the same records, and the same settings (a mapped teacher resumes a plain one's cache)
    rows = [{"id": str(i), "prompt": p, "response": q} for i, (p, q) in enumerate(zip(PROMPTS, PROMPTS[1:]))]
    source = load_source(__import__("datasets").Dataset.from_list(rows))
    a = annotate(load_teacher(saved_teacher), source, tmp_path / "plain", top_k=16, shard_size=2)
    b = annotate(load_teacher(saved_teacher, device_map="auto"), source, tmp_path / "auto", top_k=16, shard_size=2)
    assert load_annotations(a).to_list() == load_annotations(b).to_list()
    assert (a / "tdrl-annotation.json").read_text() == (b / "tdrl-annotation.json").read_text()


@pytest.mark.parametrize(
    "device_map, message",
    [
        ("gpu0", "'gpu0', not a device; use auto, balanced"),
        ("{not json", "is not valid JSON"),
        ("", "is empty: leave it out"),
        ("disk", "which offloads weights"),
        ({"": "meta"}, "which offloads weights"),
        ({"": 1.5}, "must be a GPU index or a device string"),
        ([0, 1], "must be one of auto"),
    ],
)
def test_a_malformed_device_map_is_a_config_error(device_map, message):
    with pytest.raises(ConfigError, match=message):
        parse_device_map(device_map)
    with pytest.raises(ConfigError, match=message):
        load_teacher("tiny", device_map=device_map)


def test_a_map_that_does_not_fit_the_teacher_or_the_machine_is_a_config_error(saved_teacher, monkeypatch):
    for name in ("tiny", saved_teacher):  # in memory (dispatch) and through from_pretrained (checked on an empty model)
        with pytest.raises(ConfigError, match=r"gives no device to \d+ weight\(s\) of the teacher \(e.g. 'lm_head"):
            load_teacher(name, device_map={"transformer": "cpu"})
        with pytest.raises(
            ConfigError, match=r"names 'encoder', which is no module of the teacher .*transformer, lm_head"
        ):
            load_teacher(name, device_map={"encoder": "cpu", "": "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="names 'cuda:0' but this machine has 0 CUDA GPU"):
            load_teacher("tiny", device_map="cuda:0")
        with pytest.raises(ConfigError, match="names 1 but this machine has 0 CUDA GPU"):
            load_teacher(saved_teacher, device_map={"transformer": "cpu", "lm_head": 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine: "auto" would claim every GPU twice
    with pytest.raises(ConfigError, match="2 processes on this machine would each load their own copy"):
        load_teacher("tiny", device_map="auto")


def test_the_command_line_and_the_config_take_a_device_map(tmp_path, capsys):
    from tdrl.cli import main
    from tdrl.training.config import TrainConfig

    flags = ["--teacher", "tiny", "--source", "bundled", "--limit", "2", "--out", str(tmp_path / "r")]
    assert main(["generate-responses", *flags, "--teacher-device-map", "{oops"]) == 2
    assert "teacher device map '{oops' is not valid JSON" in capsys.readouterr().err
    flags += ["--max-new-tokens", "2", "--teacher-device-map", "auto", "--teacher-dtype", "bfloat16"]
    assert main(["generate-responses", *flags]) == 0
    assert TrainConfig.from_dict({"teacher_device_map": {"": "cpu"}}).teacher_device_map == '{"": "cpu"}'  # YAML map
    with pytest.raises(ConfigError, match="not a device"):
        TrainConfig(teacher_device_map="gpu0")


def test_offloaded_weights_are_refused():
    from accelerate import cpu_offload

    from tdrl.models.tiny import tiny_teacher

    teacher = tiny_teacher()
    cpu_offload(teacher.model, execution_device=torch.device("cpu"))  # every weight on meta, brought in per forward
    with pytest.raises(ConfigError, match=r"weight\(s\) .* are offloaded .* needs every one on a device"):
        check_in_memory(teacher.model, teacher.name)
    with pytest.raises(ConfigError, match="are offloaded"):
        teacher.weights_fingerprint()  # its caches are keyed by this hash: never of meta tensors


def test_the_input_device_is_the_input_embeddings_not_the_first_weight():
    class HeadFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 8, device="meta")  # registered first: the first weight is on meta
            self.embed = torch.nn.Embedding(8, 4)

        def get_input_embeddings(self):
            return self.embed

    model = HeadFirst()
    assert next(model.parameters()).device.type == "meta" and input_device(model) == torch.device("cpu")
    model.get_input_embeddings = None  # no embeddings to ask: the first weight's device
    assert input_device(model).type == "meta"


def test_a_layer_student_of_a_dispatched_teacher_is_an_ordinary_model(batch):
    from accelerate import dispatch_model

    ids, mask = batch
    plain, hooked = load_teacher("tiny"), load_teacher("tiny")
    device_map = {"transformer": "cpu", "lm_head": "cpu"}
    dispatch_model(hooked.model, device_map=device_map, force_hooks=True, main_device="cpu")  # accelerate's hooks
    assert hasattr(hooked.model.lm_head, "_hf_hook")
    assert same_annotation(hooked.annotate(ids, mask, top_k=16), plain.annotate(ids, mask, top_k=16))
    student, reference = load_student("layers:1", teacher=hooked), load_student("layers:1", teacher=plain)
    assert not any(hasattr(m, "_hf_hook") for m in student.model.modules())
    assert not hasattr(student.model, "hf_device_map")
    assert torch.equal(student.model(input_ids=ids).logits, reference.model(input_ids=ids).logits)
    hooked.model.hf_device_map = {"transformer": 0, "lm_head": 1}  # as from_pretrained records two GPUs
    with pytest.raises(ConfigError, match="is spread over 0, 1 by a device map: it stays where the map put it"):
        hooked.to("cpu")


#: Measured on these states (the tiny teacher, 4 prompts, 186 states): bfloat16 max 0.051 / mean 0.016 nats,
#: float16 max 0.009 / mean 0.002; the bundled teacher (223 states): bfloat16 0.26 / 0.035, float16 0.047 / 0.008.
TOLERANCE = {"bfloat16": (0.1, 0.03), "float16": (0.02, 0.005)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_teacher_annotates_within_the_stated_tolerance(batch, dtype):
    ids, mask = batch
    full = load_teacher("tiny").annotate(ids, mask, top_k=16, top_p=0.8)
    half_teacher = load_teacher("tiny", dtype=dtype)
    assert next(half_teacher.model.parameters()).dtype == getattr(torch, dtype)
    half = half_teacher.annotate(ids, mask, top_k=16, top_p=0.8)
    states, actions = mask.bool(), mask[:, 1:].bool()
    gap = (full.token_logprob - half.token_logprob)[actions].abs()
    worst, mean = TOLERANCE[dtype]
    assert gap.max() < worst and gap.mean() < mean and gap.max() > 0  # > 0: the weights really are half precision
    assert (full.subset.ids[..., 0] == half.subset.ids[..., 0])[states].float().mean() >= 0.95  # the same top token
    sizes = (full.subset.mask.sum(-1) - half.subset.mask.sum(-1))[states].abs()
    assert sizes.max() <= 1 and sizes.float().mean() < 0.2  # A_p(s) gains or loses at most one token near its edge


def test_train_warm_start_and_compare_load_their_teacher_with_the_map(monkeypatch, tmp_path):
    """The online agents' teacher (kd-online's, the episodes') is the one these load: with --teacher-dtype
    and --teacher-device-map."""
    import importlib

    from tdrl.compare import compare
    from tdrl.training import build_trainer
    from tdrl.training.config import TrainConfig
    from tdrl.training.warmstart import warm_start

    class Loaded(Exception):
        pass

    seen = []

    def load(name, **kwargs):
        seen.append((name, kwargs["dtype"], kwargs["device_map"]))
        raise Loaded

    for module in ("tdrl.models", "tdrl.training.build", "tdrl.compare"):
        monkeypatch.setattr(importlib.import_module(module), "load_teacher", load)
    values = {"teacher": "tiny", "teacher_dtype": "bfloat16", "teacher_device_map": '{"": "cpu"}'}
    config = TrainConfig.from_dict({**values, "agent": "kd-online", "student": "tiny", "out": str(tmp_path / "r")})
    for run in (
        lambda: build_trainer(config),
        lambda: warm_start(config, tmp_path / "w"),
        lambda: compare(["kd-online"], [0], config, tmp_path / "c"),
    ):
        with pytest.raises(Loaded):
            run()
    assert seen == [("tiny", "bfloat16", '{"": "cpu"}')] * 3


def test_a_run_with_a_device_mapped_teacher_trains_end_to_end_and_its_export_reloads(tmp_path, capsys):
    """`tdrl train --teacher-device-map auto` (and a bf16 teacher) on the tiny models: the run ends, its
    checkpoint's student reloads with transformers, and the run records the map."""
    from transformers import AutoModelForCausalLM

    from tdrl.cli import main
    from tdrl.training.checkpoints import find_checkpoint

    out = tmp_path / "run"
    flags = "--teacher tiny --student tiny --data bundled --train-prompts 8 --response-tokens 4 --batch-size 4"
    flags += " --eval-prompts 2 --eval-max-new-tokens 2 --test-prompts 0 --eval-every 0 --steps 2"
    argv = ["train", "--agent", "bc", *flags.split(), "--teacher-device-map", "auto", "--teacher-dtype", "bfloat16"]
    assert main([*argv, "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(find_checkpoint(out) / "student")
    assert model.config.vocab_size == 512
    assert '"teacher_device_map": "auto"' in (find_checkpoint(out) / "config.json").read_text().replace("'", '"')
