"""From sampled tokens to streamed `RequestOutput` deltas: detokenize, stop, parse.

Per sequence: incremental detokenization, stop tokens and stop strings (on the text; a stop string is cut
from the output unless include_stop_str_in_output, and text that might still become a stop string is
held back from the stream), max_tokens / max_model_len, the reasoning budget (when exceeded, `</think>`
is forced as the next token), then the reasoning / tool-call parser on the released text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .parsers import OutputParser, make_output_parser
from .parsers.reasoning import THINK_END
from .sampler import SampledToken
from .sequence import Request, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _SeqState:
    detokenizer: IncrementalDetokenizer
    parser: OutputParser | None
    # Decoded text not streamed yet: a possible stop-string start held back, and this step's new text.
    # A stop string can only start here, since streamed text never ends with a proper prefix of one.
    pending: str = ""
    in_reasoning: bool = False  # still before `</think>` (reasoning budget bookkeeping)
    cumulative_logprob: float = 0.0  # of the sampled tokens (when logprobs are asked for)


@dataclass
class _RequestState:
    request: Request
    seqs: dict[int, _SeqState] = field(default_factory=dict)  # by sequence index
    sent_first: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, reasoning_parser: str = "",
                 tool_call_parser: str = ""):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        make_output_parser(reasoning_parser, tool_call_parser)  # unknown names fail at startup
        self.think_end_id = tokenizer.added_tokens.get(THINK_END)
        self._states: dict[str, _RequestState] = {}

    def add(self, request: Request) -> None:
        state = _RequestState(request)
        in_reasoning = bool(self.reasoning_parser) and request.thinking
        for seq in request.sequences:
            detok = IncrementalDetokenizer(self.tokenizer, request.params.skip_special_tokens)
            state.seqs[seq.index] = _SeqState(detok, self._make_parser(request), in_reasoning=in_reasoning)
        self._states[request.request_id] = state

    def _make_parser(self, request: Request) -> OutputParser | None:
        if not (self.reasoning_parser or self.tool_call_parser):
            return None
        return make_output_parser(self.reasoning_parser, self.tool_call_parser,
                                  thinking_enabled=request.thinking, tools_enabled=request.has_tools)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, seqs: list[Sequence], sampled: list[SampledToken]) -> list[RequestOutput]:
        """Account one new token per sequence (already appended); one RequestOutput per request."""
        by_request: dict[str, list[CompletionOutput]] = {}
        for seq, token in zip(seqs, sampled, strict=True):
            by_request.setdefault(seq.request.request_id, []).append(self._advance(seq, token))
        return [self._output(self._states[rid], outs) for rid, outs in by_request.items()]

    def abort(self, request: Request, error: str | None = None) -> RequestOutput:
        """Finish every unfinished sequence with "abort" (and `error` when the engine failed)."""
        state = self._states.get(request.request_id) or _RequestState(request, sent_first=True)
        outs = []
        for seq in request.sequences:
            if not seq.is_finished:
                seq.finish("abort")
                outs.append(CompletionOutput(seq.index, finish_reason="abort",
                                             num_output_tokens=seq.num_output_tokens,
                                             cumulative_logprob=self._cumulative_logprob(state, seq)))
        out = self._output(state, outs)
        out.error = error
        return out

    @staticmethod
    def _cumulative_logprob(state: _RequestState, seq: Sequence) -> float | None:
        """The running sum a final abort output carries on (None when logprobs were not asked for)."""
        if seq.params.logprobs is None:
            return None
        seq_state = state.seqs.get(seq.index)
        return seq_state.cumulative_logprob if seq_state is not None else 0.0

    # Per token --------------------------------------------------------------------------------------

    def _advance(self, seq: Sequence, token: SampledToken) -> CompletionOutput:
        state = self._states[seq.request.request_id].seqs[seq.index]
        request, params = seq.request, seq.params
        token_id = token.token_id
        if seq.grammar is not None:
            seq.grammar.accept(token_id)
        if token_id == self.think_end_id:
            state.in_reasoning = False
        is_stop_token = token_id in request.stop_token_ids and seq.num_output_tokens >= params.min_tokens
        new_text = ""
        if not is_stop_token or params.include_stop_str_in_output:
            new_text = state.detokenizer.step([token_id])
            state.pending += new_text
        if is_stop_token:
            seq.finish("stop", None if token_id in request.eos_token_ids else token_id)
        elif params.stop and seq.num_output_tokens > params.min_tokens:
            # As vLLM: the text of the first min_tokens tokens is never cut, so a stop string must end in a
            # later token's text (it may start earlier).
            self._check_stop_strings(seq, state, len(new_text))
        if not seq.is_finished and seq.grammar is not None and seq.grammar.is_complete:
            seq.finish("stop")
        if not seq.is_finished and (
            seq.num_output_tokens >= request.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish("length")
        if seq.is_finished and not isinstance(seq.stop_reason, str):
            state.pending += state.detokenizer.finish()  # an incomplete character at the very end
        seq.forced_token_id = self._forced_token(seq, state)
        return self._completion(seq, state, token)

    def _check_stop_strings(self, seq: Sequence, state: _SeqState, new_len: int) -> None:
        """Stop at the first stop string that ends in this step's new text. One ending in the text held back
        was completed within the first min_tokens tokens (else an earlier step would have stopped): as in
        vLLM, it does not count."""
        params = seq.params
        new_start = len(state.pending) - new_len
        found: tuple[int, str] | None = None
        for stop in params.stop:
            pos = state.pending.find(stop, max(0, new_start - len(stop) + 1))
            if pos >= 0 and (found is None or pos < found[0]):
                found = (pos, stop)
        if found is None:
            return
        pos, stop = found
        state.pending = state.pending[: pos + len(stop) if params.include_stop_str_in_output else pos]
        seq.finish("stop", stop)

    def _forced_token(self, seq: Sequence, state: _SeqState) -> int | None:
        budget = seq.params.reasoning_max_tokens
        if seq.is_finished or not state.in_reasoning or budget is None or self.think_end_id is None:
            return None
        return self.think_end_id if seq.num_output_tokens >= budget else None

    # Deltas -----------------------------------------------------------------------------------------

    def _release(self, seq: Sequence, state: _SeqState) -> str:
        """New text safe to stream: all of it once finished, else short of a possible stop-string start."""
        keep = 0 if seq.is_finished else _partial_stop_len(state.pending, seq.params.stop)
        delta = state.pending[: len(state.pending) - keep]
        state.pending = state.pending[len(delta) :]
        return delta

    def _completion(self, seq: Sequence, state: _SeqState, token: SampledToken) -> CompletionOutput:
        text = self._release(seq, state)
        out = CompletionOutput(seq.index, token_ids=[token.token_id], num_output_tokens=seq.num_output_tokens)
        if state.parser is None:
            out.text = text
        else:
            out.parsed = True
            self._parse(out, state, text, final=seq.is_finished)
        if seq.params.logprobs is not None and token.logprob is not None:
            out.logprobs = [self._logprob(token)]
            state.cumulative_logprob += token.logprob
            out.cumulative_logprob = state.cumulative_logprob
        if seq.is_finished:
            reason = seq.finish_reason
            called_tools = state.parser is not None and state.parser.has_tool_calls
            out.finish_reason = "tool_calls" if reason == "stop" and called_tools else reason
            out.stop_reason = seq.stop_reason
        return out

    def _parse(self, out: CompletionOutput, state: _SeqState, text: str, final: bool) -> None:
        deltas = [state.parser.feed(text)] if text else []
        if final:
            deltas.append(state.parser.finish())
        for delta in deltas:
            out.reasoning_text += delta.reasoning_text
            out.text += delta.text
            out.tool_calls.extend(delta.tool_calls)

    def _logprob(self, token: SampledToken) -> TokenLogprob:
        decode = self.tokenizer.decode_token
        top = [(tid, decode(tid), lp) for tid, lp in token.top_logprobs]
        return TokenLogprob(token.token_id, decode(token.token_id), token.logprob, top, token.rank)

    def _prompt_logprobs(self, request: Request) -> list[TokenLogprob] | None:
        if request.prompt_logprobs is None:
            return None
        first = request.prompt_token_ids[0]
        return [TokenLogprob(first, self.tokenizer.decode_token(first), None)] + [
            self._logprob(token) for token in request.prompt_logprobs]

    def _output(self, state: _RequestState, outs: list[CompletionOutput]) -> RequestOutput:
        request = state.request
        out = RequestOutput(
            request_id=request.request_id,
            outputs=outs,
            num_prompt_tokens=request.num_prompt_tokens,
            prompt_token_ids=None if state.sent_first else list(request.prompt_token_ids),
            prompt_logprobs=None if state.sent_first else self._prompt_logprobs(request),
            num_cached_tokens=max(request.sequences[0].num_cached_tokens, 0),
            finished=request.finished,
        )
        state.sent_first = True
        if out.finished:
            self.remove(request.request_id)
        return out


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
