"""Reasoning / tool-call parsers: whole-text parse equals streaming at every split, OpenAI delta shapes."""

from __future__ import annotations

import json
import random

import pytest
from ernie_engine.outputs import CompletionOutput, RequestOutput, merge_outputs
from ernie_engine.parsers import OutputParser, make_output_parser, merge_tool_call_deltas, parse_output

THINKING = "ernie-45-vl-thinking"
WEATHER = {"location": "北京", "unit": "c"}


def call_block(name: str, arguments: dict, spacing: str = " ") -> str:
    body = json.dumps(
        {"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":" + spacing)
    )
    return f"<tool_call>\n{body}\n</tool_call>\n"


def summary(reasoning: str, content: str, calls: list) -> tuple:
    return reasoning, content, [(c.name, json.loads(c.arguments)) for c in calls]


def stream(parser: OutputParser, pieces: list[str]) -> tuple[str, str, list[dict]]:
    reasoning, content, deltas = "", "", []
    for piece in pieces:
        step = parser.feed(piece)
        reasoning, content, deltas = (
            reasoning + step.reasoning_text,
            content + step.text,
            deltas + step.tool_calls,
        )
    last = parser.finish()
    return reasoning + last.reasoning_text, content + last.text, deltas + last.tool_calls


def calls_from_deltas(deltas: list[dict]) -> list[tuple[str, dict]]:
    """Accumulate OpenAI streaming deltas by index, as a client does, checking their shape on the way."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d["index"] not in calls:  # the first delta of a call: id, type, name and no arguments yet
            assert d["id"].startswith("chatcmpl-tool-") and d["type"] == "function", d
            assert d["function"]["name"] and d["function"]["arguments"] == "", d
            calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
        else:  # later deltas: only the index and an arguments fragment
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
        calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls))), "indexes count up from 0"
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def assert_split_invariant(
    text: str, reasoning_parser: str, tool_parser: str, thinking: bool = True
) -> tuple:
    """Whole-text result; asserts every 2-way split, char-by-char and random splits give the same."""
    reasoning, content, calls = parse_output(text, reasoning_parser, tool_parser, thinking_enabled=thinking)
    expected = summary(reasoning, content, calls)
    rng = random.Random(0)
    cuts = [[i] for i in range(len(text) + 1)] + [list(range(len(text)))]
    cuts += [sorted(rng.sample(range(len(text)), min(len(text), 5))) for _ in range(20)]
    for cut in cuts:
        pieces = [text[a:b] for a, b in zip([0, *cut], [*cut, len(text)], strict=True)]
        parser = make_output_parser(reasoning_parser, tool_parser, thinking_enabled=thinking)
        r, c, deltas = stream(parser, pieces)
        assert (r, c, calls_from_deltas(deltas)) == expected, pieces
        assert parser.has_tool_calls == bool(calls)
        merged = merge_tool_call_deltas(deltas)
        assert [c["function"]["arguments"] for c in merged] == [c.arguments for c in parser.tool_calls]
        assert [c["id"] for c in merged] == [c.id for c in parser.tool_calls]
    return expected


def test_thinking_tool_call_after_think_end():
    args = {"bbox_2d": [10, 20.5, 300, 400], "label": "old lady", "nested": {"q": 'a "quoted" \\ word'}}
    text = "The user wants a crop.\n</think>\n\n\n" + call_block("image_zoom_in_tool", args)
    assert assert_split_invariant(text, THINKING, THINKING) == (
        "The user wants a crop.\n",
        "",
        [("image_zoom_in_tool", args)],
    )


def test_parallel_calls_and_compact_json():
    text = "plan\n</think>\n\n\n" + call_block("get_weather", WEATHER, "") + "\n" + call_block("f", {}) + "\n"
    expected = ("plan\n", "", [("get_weather", WEATHER), ("f", {})])
    assert assert_split_invariant(text, THINKING, THINKING) == expected
    reasoning, content, deltas = stream(make_output_parser(THINKING, THINKING), [text])
    # Name first, then the arguments member by member; the argument-less call still gets "{}".
    assert [(d["index"], "id" in d, d["function"]["arguments"]) for d in deltas] == [
        (0, True, ""),
        (0, False, '{"location": "北京"'),
        (0, False, ', "unit": "c"}'),
        (1, True, ""),
        (1, False, "{}"),
    ]
    assert merge_tool_call_deltas(deltas)[0]["function"] == {
        "name": "get_weather",
        "arguments": json.dumps(WEATHER, ensure_ascii=False),
    }


def test_non_streaming_output_holds_one_whole_call_per_index():
    text = "plan\n</think>\n" + call_block("get_weather", WEATHER) + call_block("f", {"a": [1, 2]})
    parser = make_output_parser(THINKING, THINKING)
    steps = [parser.feed(text[:40]), parser.feed(text[40:]), parser.finish()]
    deltas = [RequestOutput("r", [CompletionOutput(0, tool_calls=s.tool_calls)], 1) for s in steps]
    (merged,) = merge_outputs(deltas).outputs
    assert merged.tool_calls == [{"index": i, **c.to_openai()} for i, c in enumerate(parser.tool_calls)]


def test_text_before_tool_call_means_no_call():
    text = "r\n</think>\n\nSure, calling it: " + call_block("get_weather", WEATHER)
    assert assert_split_invariant(text, THINKING, THINKING) == (
        "r\n",
        "\n\nSure, calling it: " + call_block("get_weather", WEATHER),
        [],
    )


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "f", "arguments": {"a": 1,}}',  # trailing comma
        '{"name": "f", "arguments": [1, 2]}',  # arguments not an object
        '{"arguments": {"a": 1}}',  # no name
        "not json at all",
        # JSON Python reads but that cannot go out as strict JSON in UTF-8
        '{"name": "f", "arguments": {"a": NaN}}',
        '{"name": "f", "arguments": {"a": 1e400}}',  # inf
        '{"name": "f", "arguments": {"a": "\\ud800"}}',  # a lone surrogate
        '{"name": "\\udc00", "arguments": {}}',
    ],
)
def test_malformed_block_is_content_verbatim(body):
    block = f"<tool_call>\n{body}\n</tool_call>"
    text = "r</think>\n\n" + block
    assert assert_split_invariant(text, THINKING, THINKING) == ("r", "\n\n" + block, [])


def test_malformed_block_keeps_later_valid_call():
    bad = "<tool_call>\n{oops}\n</tool_call>"
    text = "r</think>\n" + bad + "\n" + call_block("g", {"x": "y"})
    assert assert_split_invariant(text, THINKING, THINKING) == ("r", "\n" + bad, [("g", {"x": "y"})])


@pytest.mark.parametrize("value", ["1" * 5000, "[" * 5000 + "]" * 5000])
def test_json_python_refuses_is_content_not_an_engine_failure(value):
    """Too many digits (ValueError) or too deep (RecursionError): raising would fail the whole engine step."""
    block = f'<tool_call>\n{{"name": "f", "arguments": {{"a": {value}}}}}\n</tool_call>'
    text = "r</think>\n" + block + "\n" + call_block("g", {})
    expected = ("r", "\n" + block, [("g", {})])
    assert summary(*parse_output(text, THINKING, THINKING)) == expected
    assert stream(make_output_parser(THINKING, THINKING), list(text))[:2] == expected[:2]


def test_end_tag_inside_an_argument_string_is_text():
    args = {"code": "print('</tool_call>')", "note": 'a \\"</tool_call>\\" and }</tool_call>'}
    other = {"x": "<tool_call>"}
    text = "r</think>\n" + call_block("run", args) + call_block("g", other)
    assert assert_split_invariant(text, THINKING, THINKING) == ("r", "", [("run", args), ("g", other)])
    # A block whose string never closes is no call: its first end tag ended it after all, as in vLLM.
    bad = '<tool_call>\n{"name": "f", "arguments": {"a": "x}}\n</tool_call>'
    text = "r</think>\n" + bad + "\n" + call_block("g", {}) + "done"
    assert assert_split_invariant(text, THINKING, THINKING) == ("r", "\n" + bad + "\ndone", [("g", {})])
    cut = "\n<tool_call>\n{\"name\": \"g\", \"argu"  # also when the text ends in an unclosed block
    text = "r</think>\n" + bad + cut
    assert assert_split_invariant(text, THINKING, THINKING) == ("r", "\n" + bad + cut, [])


def test_unclosed_block_at_end():
    complete = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}'
    assert assert_split_invariant("r</think>\n" + complete, THINKING, THINKING) == (
        "r",
        "",
        [("f", {"a": 1})],
    )
    truncated = '<tool_call>\n{"name": "f", "argu'
    assert assert_split_invariant("r</think>\n" + truncated, THINKING, THINKING) == (
        "r",
        "\n" + truncated,
        [],
    )


def test_string_arguments_accepted():
    body = json.dumps({"name": "f", "arguments": json.dumps({"k": "v"})})
    text = f"r</think><tool_call>{body}</tool_call>"
    assert assert_split_invariant(text, THINKING, THINKING) == ("r", "", [("f", {"k": "v"})])


def test_thinking_disabled_tool_call_from_start():
    text = "\n" + call_block("get_weather", WEATHER)
    assert assert_split_invariant(text, THINKING, THINKING, thinking=False) == (
        "",
        "",
        [("get_weather", WEATHER)],
    )


def test_ernie_45_vl_reasoning():
    text = "Let me look at the picture.</think>It shows a vase from the Ming dynasty."
    assert assert_split_invariant(text, "ernie-45-vl", "") == (
        "Let me look at the picture.",
        "It shows a vase from the Ming dynasty.",
        [],
    )
    # thinking disabled: no reasoning at all, even if a tag appears
    assert assert_split_invariant(text, "ernie-45-vl", "", thinking=False) == ("", text, [])
    # cut before </think> while thinking: all reasoning, streamed or whole
    assert assert_split_invariant("half a thought </thi", "ernie-45-vl", "") == (
        "half a thought </thi",
        "",
        [],
    )
    # a stray opening tag is dropped; a lone `<` stays text
    assert assert_split_invariant("<think>a < b</think>yes", "ernie_45_vl", "") == ("a < b", "yes", [])
    assert assert_split_invariant("<", "ernie-45-vl", "") == ("<", "", [])


def test_no_tool_parser_keeps_markup_as_content():
    text = "r</think>" + call_block("f", {})
    assert assert_split_invariant(text, "ernie-45-vl", "") == ("r", call_block("f", {}), [])
    parser = make_output_parser(THINKING, THINKING, tools_enabled=False)
    assert stream(parser, [text])[1] == call_block("f", {})


def test_no_parsers_is_identity():
    text = "plain </think> <tool_call>{}</tool_call>"
    assert assert_split_invariant(text, "", "") == ("", text, [])


def test_parser_names():
    assert make_output_parser("ERNIE_45_VL_THINKING", "ernie_45_vl_thinking").tools is not None
    with pytest.raises(ValueError, match="ernie-45-vl, ernie-45-vl-thinking"):
        make_output_parser("deepseek-r1")
    with pytest.raises(ValueError, match="valid: ernie-45-vl-thinking"):
        make_output_parser("", "hermes")


def test_reasoning_ended_flag():
    parser = make_output_parser("ernie-45-vl")
    parser.feed("abc</th")
    assert not parser.reasoning_ended
    assert parser.feed("ink>x").text == "x"
    assert parser.reasoning_ended
