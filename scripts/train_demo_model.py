"""Train the embedded demo model `checkpoints/ernie-4.5-tiny`: a small Ernie4_5ForCausalLM on the synthetic
chat corpus of `demo_corpus.py`, on CPU with PaddlePaddle, reproducibly (seeded, deterministic data order).

    OMP_NUM_THREADS=1 MKL_DEBUG_CPU_TYPE=5 python scripts/train_demo_model.py --out checkpoints/ernie-4.5-tiny

Steps: a sentencepiece BPE tokenizer (ERNIE specials, byte fallback) is trained on the rendered corpus
(`make_random_model.train_tokenizer`); tokenizer files, config.json and generation_config.json are written
first, so the chat template, tokenizer and model class used for training are the checkpoint's own (the
engine's `ChatTemplate`, `Tokenizer` and `loader.build_model`). Each conversation becomes one example: its
final assistant turn after the prompt the engine would render for it (`add_generation_prompt=True`, its
`enable_thinking`, its tools); the loss covers only that turn's tokens and the closing
`<|end_of_sentence|>`. Examples are packed into flat batches (the model's cache-free causal attention keeps
them apart). Two phases: capitals, arithmetic and facts alone (`demo_corpus.first_phase_corpus`) for
`--first-phase-steps`, then the whole mix (`demo_corpus.build_corpus`, weather included); one AdamW run with
linear warmup and cosine decay over both. Weights saved in bf16 (`model.safetensors`, the
-Paddle layout) and checked by loading them back through `loader.load_model`.

What made it learn (each change measured on 150-1200-step runs with the held-out probe logged every 25
steps: teacher-forced exact answers to 50 held-out capital questions):
- tokenizer: BPE on the raw corpus had merged whole Chinese questions and answers into single tokens
  ("科威特的首都是科威特城"), so no phrasing shared tokens with another; it now sees Chinese one character
  at a time (`tokenizer_sentences`), and a 3000-piece vocabulary;
- q/k/v init std 0.07 (`--qkv-std`; was 0.02): with near-uniform attention at init the model sat on a
  plateau, predicting answer formats but never the country (0% held-out after 1200 steps at lr 2e-3);
  with sharper initial attention the copy of the country appears after ~700 steps;
- lr 2e-3 (5e-3 and 1e-2 were slower and noisier), warmup 50, cosine decay to 10%;
- throughput: hidden 192, 3 layers (1.9M parameters) and 256-token length-bucketed batches: ~0.15 s/step
  instead of 0.9-3.5 s, i.e. many more optimizer steps in the same time;
- data: more English and Chinese phrasings per country (31 in all).

Issue 9 (copying into the weather tool call and its follow-up), measured with the probes logged every 500
steps (teacher-forced copies for held-out weather phrasings) and `scripts/eval_demo_model.py`:
- the first city token in a call came out wrong because "in Beijing?" and '"Beijing"' were different tokens
  ("▁Beijing" / "Beijing"): the model had to learn a translation per city. `tokenizer_sentences` now cuts
  before every capitalised word after a space or a quote, so a name is the same tokens everywhere;
- copies that repeat the question's context are learned early (an induction pattern: "the weather in
  Paris" -> "... in Paris"; the capital answers; the follow-up's city). The call's copy is not one: the
  city follows `"location": "`, which the question does not contain. Weather round trips alone (up to 1500
  per epoch, 8000 steps, copy tokens weighted x5) never learned it: 0% of calls named the city. What did:
  short requests for the call's JSON without the ~130-token tool preamble (`call_json_conversations`), many
  copies per batch: with them the call names a trained city for held-out phrasings ~60-70% of the time;
- `Conversation.copy` marks the tokens an answer hinges on (a copied city / temperature / weather, a
  recalled capital); the loss weighs them x5 (`--copy-weight`): held-out capitals rose faster with it;
- more weather data costs the capitals: 4000 steps of 375 round trips gave 76% held-out capitals, with
  1500 short chats 70%, and 8000 steps of the full mix 62-84% (the old 4000-step mix: 96%);
- the temperature in the follow-up: with "... with a temperature of 23 degrees" the first digit followed a
  space token that also precedes the city in the tool result, so it was confused (3/10 stated). Answering in
  the result's own words ("temperature: 23", `demo_corpus.weather_answer`) fixed the first digit but the
  second was still often wrong (23 -> 22 / 92; 4/10). Whole numbers 10-105 as single tokens
  (`write_tokenizer`) make the temperature one token copied after the same "temperature: " context: 10/10
  held-out follow-ups and Beijing's 23 with thinking on and off (8000 steps, 2 threads, 12.7 min);
- the capitals are what the weather data costs, not the tokenizer: with the same tokenizer (names split,
  numbers whole) and no weather data (`--weather-en 0 --weather-zh 0 --weather-short 0 --call-json 0
  --first-phase-steps 0`), 4000 steps give 100% held-out capitals; with the weather mix 62% at 8000 steps;
- a first phase on capitals, arithmetic and facts alone (`--first-phase-steps`, `first_phase_corpus`),
  then the mix: with that corpus twice in the mix (2500 + 6500 steps) capitals 94% but the weather copies
  only began at the end (1/10 held-out calls named the city); once in the mix they are learned;
- every capital failure left was one held-out phrasing, "I wonder which city is X's capital?": "wonder"
  never occurs in training (tokens "I", "▁w", "on", "d", "er"), and the model answered another country or
  another capital (62-78% held-out). More phrasings with the country not after "capital of" (`TRAIN_EN`)
  fixed the wrong countries; openers before some English questions (`OPENERS`: "Hey, ", "I'm curious: ",
  ...) teach that a question's first words do not change its answer: with them before half the questions
  100% held-out (but in that run the call's city copy was not learned by the end), a third: 92%;
- fewer tool round trips (240 + 60 instead of 300 + 75; each is a whole 256-token batch for ~30 scored
  tokens) and more short call requests (2000) leave steps for the copies. When the call's city copy
  appears varies from run to run (steps ~4500-7500): it is what limits the budget;
- negative temperatures as single tokens like 10-105: "-3" had come out "3".

Measured for this recipe (default arguments, one thread pinned to one core with `taskset -c 0` while another
job kept the machine's other core busy; 2026-11-30 02:33-02:48 UTC):

    OMP_NUM_THREADS=1 MKL_DEBUG_CPU_TYPE=5 taskset -c 0 python scripts/train_demo_model.py --out DIR

9000 steps (1500 first phase) in 14.8 min, 1.90M parameters, 3.7 MiB: the committed checkpoint (a second
run of this command wrote byte-identical files).
scripts/eval_demo_model.py: held-out capitals 92% (the 4 misses: "I wonder which city is X's capital?");
the seed question answers "The capital of China is Beijing." with thinking on and off; the weather call
names Beijing and the follow-up states 23 with thinking on and off; held-out weather phrasings: 9/10 valid
calls (the miss: "帮我看看拉巴特的天气。", whose 帮 and 看 are bytes to the tokenizer), 5/10 name the city,
8/10 follow-ups state the tool's temperature. Capitals whose weather training never asks for
(`--never-asked`) are not copied into the call.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import sentencepiece as spm
from safetensors.paddle import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT / "scripts"))
import demo_corpus  # noqa: E402
import make_random_model as mrm  # noqa: E402
from ernie_engine import loader  # noqa: E402
from ernie_engine.chat_template import ChatTemplate  # noqa: E402
from ernie_engine.config import ModelConfig  # noqa: E402
from ernie_engine.layers import cpu_kernels  # noqa: E402
from ernie_engine.layers.attention import AttentionMetadata  # noqa: E402
from ernie_engine.tokenizer import Tokenizer  # noqa: E402

logger = logging.getLogger("train_demo_model")

TEMPLATE = "ernie-4.5-thinking"  # renders tools, tool calls, tool results and thinking
ASSISTANT_PREFIX = "Assistant: "
CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")  # Han characters and CJK punctuation
# Before a capitalised word after a space or a quote: "in Beijing?" and '"Beijing"' then share the token.
NAME_START = re.compile(r"(?<=[ \"])(?=[A-ZÀ-Þ])")


@dataclass
class Example:
    ids: list[int]
    prompt_len: int  # the loss covers ids[prompt_len:]
    weights: list[float] | None = None  # loss weight of each completion token (None: all 1)


@dataclass
class TrainArgs:
    steps: int
    first_phase_steps: int  # steps on the first-phase examples before the full mix
    batch_tokens: int
    lr: float
    warmup: int
    weight_decay: float
    seed: int
    log_every: int
    probe_every: int  # steps between the (slower) weather probes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def split_turn(template: ChatTemplate, conv: demo_corpus.Conversation) -> tuple[str, str]:
    """(prompt, completion) for the conversation's final assistant turn, as the engine would see it.

    The completion is the assistant's span of the full render (content, tool calls, end-of-sentence), found as
    the difference between rendering the whole conversation and rendering the messages before the turn.
    """
    *history, last = conv.messages
    if last["role"] != "assistant":
        raise ValueError(f"conversation does not end with an assistant turn: {conv.to_json()}")
    kwargs = {"enable_thinking": conv.enable_thinking}
    before = template.render(history, conv.tools, add_generation_prompt=False, **kwargs)
    full = template.render(conv.messages, conv.tools, add_generation_prompt=False, **kwargs)
    span = full[len(before) :]
    if not full.startswith(before) or not span.startswith(ASSISTANT_PREFIX):
        raise ValueError(f"the template does not render the assistant turn as a suffix: {span!r}")
    prompt = template.render(history, conv.tools, add_generation_prompt=True, **kwargs)
    return prompt, span[len(ASSISTANT_PREFIX) :]


def tokenizer_sentences(texts: list[str]) -> list[str]:
    """The corpus cut at every CJK character, plus each such character alone.

    Chinese has no spaces, so BPE on this repetitive corpus would merge whole questions and answers
    ("科威特的首都是科威特城" became one token) and a new phrasing would share no token with the trained ones.
    Cut this way, Chinese stays one character per token and the model can read the country from any question.
    Text is also cut before each capitalised word after a space or a quote, so no piece joins them: a city is
    then the same tokens in the question ("in", " ", "Beijing") as in the tool call's JSON (' "', "Beijing"),
    and the call copies tokens instead of translating "▁Beijing" into "Beijing" city by city.
    """
    sentences = []
    for text in texts:
        sentences += [piece for part in CJK.split(text) for piece in NAME_START.split(part) if piece]
        sentences += CJK.findall(text)
    return sentences


def write_tokenizer(out: Path, texts: list[str], vocab: int, seed: int) -> spm.SentencePieceProcessor:
    # Whole numbers -15..-1 and 10-105 are single pieces: a temperature is then one token, copied in one step
    # after the report's "temperature: " context (digit by digit the second digit was often wrong: 23 -> 22,
    # and a minus sign was dropped: -3 -> 3). 0-9 are single characters anyway.
    numbers = tuple(str(n) for n in [*range(-15, 0), *range(10, 106)])
    sentences = tokenizer_sentences(texts)
    model_bytes = mrm.train_tokenizer(vocab, seed, sentences=sentences, extra_symbols=numbers)
    (out / "tokenizer.model").write_bytes(model_bytes)
    return spm.SentencePieceProcessor(model_proto=model_bytes)


def write_json_files(out: Path, files: dict[str, dict]) -> None:
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def copy_weights(
    tokenizer: Tokenizer, ids: list[int], text: str, copy: tuple[str, ...], weight: float
) -> list[float]:
    """`weight` for each token of `ids` (the encoding of `text`) overlapping a `copy` text."""
    data = text.encode("utf-8")
    spans = []
    for needle in (c.encode("utf-8") for c in copy):
        start = data.find(needle)
        while start >= 0:
            spans.append((start, start + len(needle)))
            start = data.find(needle, start + 1)
    weights, offset = [], 0
    for token_id in ids:
        end = offset + len(tokenizer.token_bytes(token_id))
        weights.append(weight if any(a < end and offset < b for a, b in spans) else 1.0)
        offset = end
    if offset != len(data):
        raise ValueError(f"token bytes do not add up to the completion: {text!r}")
    return weights


def make_examples(
    template: ChatTemplate,
    conversations: list[demo_corpus.Conversation],
    tokenizer: Tokenizer,
    copy_weight: float = 1.0,
) -> list[Example]:
    """One example per conversation; tokens its final turn copies from the prompt weigh `copy_weight`."""
    examples = []
    for conv in conversations:
        prompt, completion = split_turn(template, conv)
        prompt_ids, completion_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
        weights = None
        if conv.copy and copy_weight != 1.0:
            weights = copy_weights(tokenizer, completion_ids, completion, conv.copy, copy_weight)
        examples.append(Example(prompt_ids + completion_ids, len(prompt_ids), weights))
    return examples


def init_weights(model: paddle.nn.Layer, seed: int, qkv_std: float) -> None:
    """Normal(0, 0.02) for matrices, ones for norms; output projections scaled down by depth (GPT-2).

    `qkv_std`: q/k/v projections start larger so attention scores are O(1), not ~uniform: attention can
    then pick out the country from the question early instead of after a long plateau.
    """
    rng = np.random.default_rng(seed)
    depth_scale = 1.0 / math.sqrt(2 * len(model.layers))
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            value = np.ones(param.shape, dtype=np.float32)
        else:
            std = qkv_std if name.endswith("qkv_proj.weight") else 0.02
            value = rng.normal(0.0, std, param.shape).astype(np.float32)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                value *= depth_scale
        param.set_value(paddle.to_tensor(value))
        param.stop_gradient = False


def make_batches(examples: list[Example], batch_tokens: int, rng: np.random.Generator) -> list[list[Example]]:
    """One epoch of batches of similar lengths, in a seeded random order.

    Cache-free attention pads every sequence of a batch to the longest one, so examples are bucketed by length
    (shuffled first: ties break randomly) and a batch holds at most `batch_tokens` padded tokens.
    """
    order = sorted(rng.permutation(len(examples)), key=lambda i: len(examples[i].ids))
    batches: list[list[Example]] = [[]]
    for i in order:
        longest = len(examples[i].ids)  # sorted: the newcomer is the longest of its batch
        if batches[-1] and (len(batches[-1]) + 1) * longest > batch_tokens:
            batches.append([])
        batches[-1].append(examples[i])
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_tensors(
    batch: list[Example],
) -> tuple[paddle.Tensor, paddle.Tensor, AttentionMetadata, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Flat inputs, positions, causal metadata, (index of each predicting token, its target id), weights."""
    ids, positions, predict_at, targets, weights = [], [], [], [], []
    for example in batch:
        start = len(ids)
        ids += example.ids
        positions += range(len(example.ids))
        # Token t predicts token t+1: the loss positions are those before each completion token.
        predict_at += range(start + example.prompt_len - 1, start + len(example.ids) - 1)
        targets += example.ids[example.prompt_len :]
        weights += example.weights or [1.0] * (len(example.ids) - example.prompt_len)
    meta = AttentionMetadata.build([len(e.ids) for e in batch])
    as_tensor = lambda values: paddle.to_tensor(np.asarray(values, dtype=np.int64))
    loss_weights = paddle.to_tensor(np.asarray(weights, dtype=np.float32))
    return as_tensor(ids), as_tensor(positions), meta, as_tensor(predict_at), as_tensor(targets), loss_weights


def probe_accuracy(model: paddle.nn.Layer, probe: list[Example]) -> float:
    """Share of held-out examples whose answer is the greedy choice (teacher-forced, one pass).

    Examples with copy weights count only their copied tokens (the rest, e.g. a random unit, is not
    predictable); the others count their whole answer.
    """
    correct = 0
    for at in range(0, len(probe), 8):
        chunk = probe[at : at + 8]
        ids, positions, meta, predict_at, targets, _ = batch_tensors(chunk)
        with paddle.no_grad():
            logits = model.compute_logits(paddle.gather(model(ids, positions, meta), predict_at))
        hits, start = (logits.argmax(-1) == targets).numpy(), 0
        for example in chunk:
            end = start + len(example.ids) - example.prompt_len
            mask = np.asarray(example.weights or [], dtype=np.float32) > 1.0
            correct += bool(hits[start:end][mask].all() if mask.any() else hits[start:end].all())
            start = end
    return correct / len(probe)


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    model: paddle.nn.Layer,
    phases: tuple[list[Example], list[Example]],
    probes: dict[str, list[Example]],
    args: TrainArgs,
) -> float:
    """Run `args.steps` optimizer steps, the first `args.first_phase_steps` on `phases[0]`, the rest on
    `phases[1]`, logging held-out accuracy; returns the last steps' mean loss.

    `probes`: the first is measured at every log line, the others (slower: long tool prompts) every
    `args.probe_every` steps.
    """
    decay = [p.name for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    optimizer = paddle.optimizer.AdamW(
        learning_rate=args.lr,
        parameters=model.parameters(),
        weight_decay=args.weight_decay,
        beta1=0.9,
        beta2=0.98,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
        apply_decay_param_fun=lambda name: name in decay,
    )
    rng = np.random.default_rng(args.seed)
    batches: list[list[Example]] = []
    recent: list[float] = []
    started = time.monotonic()
    for step in range(args.steps):
        if step == args.first_phase_steps:
            batches = []  # the first phase's last epoch stops here
        if not batches:
            examples = phases[step >= args.first_phase_steps]
            batches = make_batches(examples, args.batch_tokens, rng)
        ids, positions, meta, predict_at, targets, weights = batch_tensors(batches.pop())
        hidden = model(ids, positions, meta)
        logits = model.compute_logits(paddle.gather(hidden, predict_at))
        token_loss = F.cross_entropy(logits, targets.unsqueeze(-1), reduction="none").squeeze(-1)
        loss = (token_loss * weights).sum() / weights.sum()
        loss.backward()
        optimizer.set_lr(lr_at(step, args))
        optimizer.step()
        optimizer.clear_grad()
        recent = (recent + [float(loss)])[-args.log_every :]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.monotonic() - started
            names = list(probes)
            if (step + 1) % args.probe_every and step + 1 != args.steps:
                names = names[:1]
            held_out = "  ".join(f"{n} {100 * probe_accuracy(model, probes[n]):.0f}%" for n in names)
            logger.info(
                "step %d/%d  loss %.4f  held-out: %s  lr %.2e  %.0f s elapsed, ~%.0f s left",
                step + 1,
                args.steps,
                sum(recent) / len(recent),
                held_out,
                lr_at(step, args),
                elapsed,
                elapsed / (step + 1) * (args.steps - step - 1),
            )
    return sum(recent) / len(recent)


def save_weights(model: paddle.nn.Layer, path: Path, dtype: str) -> None:
    """-Paddle layout: `ernie.<param>`, Linear weights [in, out] as the model holds them."""
    tensors = {f"ernie.{name}": param.detach().astype(dtype) for name, param in model.named_parameters()}
    save_file(tensors, str(path), metadata={"format": "pd"})


def verify_checkpoint(model: paddle.nn.Layer, out: Path, example: Example) -> None:
    """Load the saved folder with the engine's loader; its greedy predictions must match the trained model."""
    loaded, _ = loader.load_model(out, dtype="float32", device="cpu")
    meta = AttentionMetadata.build([len(example.ids)])
    ids = paddle.to_tensor(np.asarray(example.ids, dtype=np.int64))
    positions = paddle.arange(len(example.ids), dtype="int64")
    with paddle.no_grad():
        want = model.compute_logits(model(ids, positions, meta)).argmax(-1)
        got = loaded.compute_logits(loaded(ids, positions, meta)).argmax(-1)
    agreement = float((want == got).astype("float32").mean())
    if agreement < 0.95:
        raise RuntimeError(
            f"the saved checkpoint predicts differently from the trained model ({agreement:.1%})"
        )
    logger.info(
        "verified: loader.load_model(%s) agrees with the trained model on %.1f%% of tokens",
        out,
        100 * agreement,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=3000, help="tokenizer vocabulary (sentencepiece BPE)")
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9000)
    parser.add_argument(
        "--first-phase-steps", type=int, default=1500, help="steps on capitals, arithmetic, facts only"
    )
    parser.add_argument("--batch-tokens", type=int, default=256, help="padded tokens per batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--qkv-std", type=float, default=0.07, help="init std of the q/k/v projections")
    parser.add_argument(
        "--copy-weight", type=float, default=5.0, help="loss weight of tokens copied from the prompt"
    )
    parser.add_argument("--weather-en", type=int, default=240, help="English weather round trips")
    parser.add_argument("--weather-zh", type=int, default=60, help="Chinese weather round trips")
    parser.add_argument("--weather-short", type=int, default=1500, help="short weather chats, no tool")
    parser.add_argument("--call-json", type=int, default=2000, help="short requests for the call's JSON")
    parser.add_argument(
        "--first-phase-repeats", type=int, default=1, help="copies of the first phase's corpus in the mix"
    )
    parser.add_argument("--probe-every", type=int, default=500, help="steps between weather probes")
    parser.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for Paddle (sets the float sums)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    paddle.set_device("cpu")
    # A fixed thread count keeps the kernels (and their float summation order) the same run to run.
    paddle.core.set_num_threads(args.threads)
    cpu_kernels.set_enabled(False)  # the custom CPU ops are inference-only (no backward): train on Paddle ops
    seed_everything(args.seed)
    started = time.monotonic()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        (out / stale).unlink(missing_ok=True)
    builtin = ChatTemplate.builtin(TEMPLATE)
    first_phase = demo_corpus.first_phase_corpus(args.seed)
    corpus = demo_corpus.build_corpus(
        args.seed,
        args.weather_en,
        args.weather_zh,
        args.weather_short,
        args.call_json,
        args.first_phase_repeats,
    )
    pairs = [split_turn(builtin, conv) for conv in corpus]
    sp = write_tokenizer(out, [p + c for p, c in pairs], args.vocab, args.seed)
    shape = mrm.ModelShape(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate,
        vocab_size=sp.get_piece_size(),
    )
    files = {**mrm.tokenizer_files(sp, TEMPLATE, shape.max_position_embeddings), **mrm.model_files(shape, sp)}
    files["config.json"]["torch_dtype"] = args.save_dtype
    write_json_files(out, files)

    # From here on everything is read back from the checkpoint folder, as the engine reads it.
    template, tokenizer = ChatTemplate.from_dir(out), Tokenizer.from_dir(out)
    first_examples = make_examples(template, first_phase, tokenizer, args.copy_weight)
    examples = make_examples(template, corpus, tokenizer, args.copy_weight)
    lengths = [len(e.ids) for e in examples]
    logger.info(
        "%d examples, %d tokens (max %d per example), vocab %d",
        len(examples),
        sum(lengths),
        max(lengths),
        tokenizer.vocab_size,
    )
    model = loader.build_model(ModelConfig.from_dir(out), "float32")
    init_weights(model, args.seed, args.qkv_std)
    logger.info("model: %s, %.2fM parameters", asdict(shape), sum(p.size for p in model.parameters()) / 1e6)
    train_args = TrainArgs(
        args.steps,
        args.first_phase_steps,
        args.batch_tokens,
        args.lr,
        args.warmup,
        args.weight_decay,
        args.seed,
        log_every=25,
        probe_every=args.probe_every,
    )
    capitals = [c for c, _ in demo_corpus.held_out_capital_conversations()]
    weather = demo_corpus.held_out_weather_conversations()
    probes = {
        "capitals": make_examples(template, capitals, tokenizer),
        "weather-call city": make_examples(template, weather[0::2], tokenizer, copy_weight=2.0),
        "follow-up copy": make_examples(template, weather[1::2], tokenizer, copy_weight=2.0),
    }
    final_loss = train(model, (first_examples, examples), probes, train_args)
    model.eval()
    save_weights(model, out / "model.safetensors", args.save_dtype)
    verify_checkpoint(model, out, examples[0])
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    logger.info(
        "done in %.1f min: final loss %.4f, %s is %.1f MiB",
        (time.monotonic() - started) / 60,
        final_loss,
        out,
        size,
    )


if __name__ == "__main__":
    main()
