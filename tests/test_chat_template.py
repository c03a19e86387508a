"""Chat templates: checkpoint template rendered like transformers, built-in fallbacks, tools, media."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ernie_engine.chat_template import (
    BUILTIN_TEMPLATES,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ChatTemplate,
    apply_chat_template,
)
from transformers.utils.chat_template_utils import render_jinja_template

from scripts.make_random_model import ModelShape, make_model

BOS = "<|begin_of_sentence|>"
EOS = "<|end_of_sentence|>"
CHAT = [
    {"role": "system", "content": "You are ERNIE."},
    {"role": "user", "content": "Where is the capital of China?"},
    {"role": "assistant", "content": "Beijing."},
    {"role": "user", "content": "And of France?"},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Determine weather in my location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
# The seed's second tool example: object arguments, content given as parts, a tool result.
SEED_TOOL_HISTORY = [
    {"role": "user", "content": [{"type": "text", "text": "Get the current weather in Beijing"}]},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"location": "Beijing", "unit": "c"}},
            }
        ],
    },
    {
        "role": "tool",
        "content": [{"type": "text", "text": "location: Beijing，temperature: 23，weather: sunny，unit: c"}],
    },
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), ModelShape(hidden_size=64), seed=0)


def reference(source: str, messages: list, **kwargs) -> str:
    rendered, _ = render_jinja_template([messages], chat_template=source, **kwargs)
    return rendered[0]


def test_plain_fallback_exact():
    assert apply_chat_template(CHAT) == (
        f"{BOS}You are ERNIE.\nUser: Where is the capital of China?\nAssistant: Beijing.{EOS}"
        "User: And of France?\nAssistant: "
    )
    assert (
        apply_chat_template(CHAT[1:2], add_generation_prompt=False)
        == f"{BOS}User: Where is the capital of China?\n"
    )


def test_thinking_fallback_exact():
    thinking = ChatTemplate.builtin("ernie-4.5-thinking")
    prompt = f"{BOS}User: hi\nAssistant: <think>"
    assert thinking.render([{"role": "user", "content": "hi"}]) == prompt
    assert thinking.render([{"role": "user", "content": "hi"}], enable_thinking=True) == prompt
    assert (
        thinking.render([{"role": "user", "content": "hi"}], enable_thinking=False) == prompt + "\n</think>\n"
    )
    assert thinking.thinking_enabled({}) and not thinking.thinking_enabled({"enable_thinking": False})
    assert not ChatTemplate.builtin().thinking_enabled({"enable_thinking": True})


def test_checkpoint_template_matches_transformers(model_dir):
    template = ChatTemplate.from_dir(model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert template.source == config["chat_template"]
    for messages in (CHAT, CHAT[1:], SEED_TOOL_HISTORY[:1] + [{"role": "assistant", "content": "ok"}]):
        for gen in (True, False):
            plain = [
                {**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
                for m in messages
            ]
            expected = reference(
                config["chat_template"], plain, add_generation_prompt=gen, cls_token=BOS, sep_token=EOS
            )
            assert template.render(messages, add_generation_prompt=gen) == expected


def test_continue_final_message_matches_transformers(model_dir):
    """The prompt ends right after the last message's text, to be continued (an assistant answer begun)."""
    started = [*CHAT[1:2], {"role": "assistant", "content": "The capital of China is"}]
    template = ChatTemplate.from_dir(model_dir)
    expected = reference(template.source, started, add_generation_prompt=False, continue_final_message=True,
                         cls_token=BOS, sep_token=EOS)
    ours = template.render(started, add_generation_prompt=False, continue_final_message=True)
    assert ours == expected and ours.endswith("Assistant: The capital of China is")
    parts = [*started[:1], {"role": "assistant", "content": [{"type": "text", "text": "The capital of"}]}]
    assert apply_chat_template(parts, add_generation_prompt=False, continue_final_message=True).endswith(
        "Assistant: The capital of")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        template.render(started, continue_final_message=True)
    with pytest.raises(ValueError, match="needs text"):
        template.render([*started[:1], {"role": "assistant", "content": " "}], add_generation_prompt=False,
                        continue_final_message=True)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("begun", ["Here is the code:\n```python\n", "Sure ", "end", "s"])
def test_continue_final_message_cut_like_transformers(name, begun):
    """The cut keeps the begun text's trailing whitespace, and is not taken inside the end-of-turn token
    (`<|end_of_sentence|>` holds "end" and "s")."""
    messages = [CHAT[1], {"role": "assistant", "content": begun}]
    expected = reference(BUILTIN_TEMPLATES[name], messages, add_generation_prompt=False,
                         continue_final_message=True)
    assert expected.endswith("Assistant: " + begun)
    template = ChatTemplate.builtin(name)
    assert template.render(messages, add_generation_prompt=False, continue_final_message=True) == expected
    parts = [CHAT[1], {"role": "assistant", "content": [{"type": "text", "text": begun}]}]
    assert template.render(parts, add_generation_prompt=False, continue_final_message=True) == expected


def test_checkpoint_template_wins(tmp_path, model_dir):
    custom = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}"
        "<assistant>{% endif %}{{ bos_token }}"
    )
    for name in ("tokenizer.model", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_dir(tmp_path).source == BUILTIN_TEMPLATES["ernie-4.5"]
    (tmp_path / "chat_template.jinja").write_text(custom)
    template = ChatTemplate.from_dir(tmp_path)
    assert template.render(CHAT[1:2]) == reference(
        custom, CHAT[1:2], add_generation_prompt=True, bos_token="<s>"
    )
    assert template.render(CHAT[1:2]) == "<user>Where is the capital of China?<assistant><s>"


def test_template_file_wins_over_tokenizer_config(tmp_path, model_dir):
    """As transformers loads a checkpoint: chat_template.jinja over tokenizer_config.json's chat_template."""
    for name in ("tokenizer.model", "special_tokens_map.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert ChatTemplate.from_dir(tmp_path).render(CHAT[1:2]) == "[Where is the capital of China?]"


def test_media_parts_become_placeholders():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}},
                {"type": "video_url", "video_url": {"url": "file:///v.mp4"}},
                {"type": "text", "text": "Describe."},
            ],
        }
    ]
    assert (
        apply_chat_template(messages)
        == f"{BOS}User: {IMAGE_PLACEHOLDER}{VIDEO_PLACEHOLDER}Describe.\nAssistant: "
    )
    with pytest.raises(ValueError, match="input_audio"):
        apply_chat_template([{"role": "user", "content": [{"type": "input_audio"}]}])
    for text in ({"text": None}, {"text": 5}, {}):  # rendered as "None", "5" and "" before
        with pytest.raises(ValueError, match="string 'text'"):
            apply_chat_template([{"role": "user", "content": [{"type": "text", **text}]}])


def test_text_parts_are_lines():
    """vLLM joins a message's text parts with newlines; media markers attach as ERNIE-VL's template does."""
    parts = [{"type": "text", "text": "First."}, {"type": "text", "text": "Second."},
             {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
             {"type": "text", "text": "Third."}]
    assert apply_chat_template([{"role": "user", "content": parts}]) == (
        f"{BOS}User: First.\nSecond.{IMAGE_PLACEHOLDER}Third.\nAssistant: "
    )


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_tools_and_tool_results(name):
    template = ChatTemplate.builtin(name)
    prompt = template.render(SEED_TOOL_HISTORY, tools=[WEATHER_TOOL])
    tools_block = prompt[prompt.index("<tools>\n") + 8 : prompt.index("\n</tools>")]
    assert json.loads(tools_block) == WEATHER_TOOL["function"]
    call = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing", "unit": "c"}}\n'
        "</tool_call>\n"
    )
    assert f"Assistant: {call}{EOS}" in prompt
    assert (
        "User: <tool_response>\nlocation: Beijing，temperature: 23，weather: sunny，unit: c\n"
        "</tool_response>\n"
        "Assistant: "
    ) in prompt
    # arguments given as the OpenAI JSON string render the same as the object form
    as_string = json.loads(json.dumps(SEED_TOOL_HISTORY))
    as_string[1]["tool_calls"][0]["function"]["arguments"] = '{"location": "Beijing", "unit": "c"}'
    assert template.render(as_string, tools=[WEATHER_TOOL]) == prompt


def test_seed_first_tool_example_renders():
    tool = {
        "type": "function",
        "function": {
            "name": "image_zoom_in_tool",
            "description": "Zoom in.",
            "parameters": {
                "type": "object",
                "properties": {
                    "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                    "label": {"type": "string"},
                },
                "required": ["bbox_2d"],
            },
            "strict": False,
        },
    }
    messages = [{"role": "user", "content": [{"type": "text", "text": "Is the old lady on the left?"}]}]
    prompt = ChatTemplate.builtin("ernie-4.5-thinking").render(messages, tools=[tool])
    assert prompt.startswith(BOS) and prompt.endswith(
        "User: Is the old lady on the left?\nAssistant: <think>"
    )
    assert '"name": "image_zoom_in_tool"' in prompt


def test_parallel_tool_results_share_one_turn():
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
    ]
    prompt = apply_chat_template(messages)
    assert prompt.endswith(
        'Assistant: <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", '
        f'"arguments": {{"x": 1}}}}\n</tool_call>\n{EOS}User: <tool_response>\n1\n</tool_response>\n'
        "<tool_response>\n2\n</tool_response>\nAssistant: "
    )


def test_bad_input_is_value_error():
    with pytest.raises(ValueError, match="non-empty"):
        apply_chat_template([])
    with pytest.raises(ValueError, match="role"):
        apply_chat_template([{"content": "x"}])
    with pytest.raises(ValueError, match="unsupported message role: critic"):
        apply_chat_template([{"role": "critic", "content": "x"}])
    raising = ChatTemplate("{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        raising.render(CHAT)
    for tools in ({"name": "f"}, ["f"]):  # the template would iterate a dict's keys or print strings
        with pytest.raises(ValueError, match="tools must be a list of objects"):
            apply_chat_template(CHAT, tools)


def test_sandboxed():
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        escape.render(CHAT)
