"""Synthetic chat corpus for the embedded demo model (seeded, reproducible).

Conversations, not text: each item is `{"messages", "tools", "enable_thinking"}` (plus `copy`, the strings
the training loss weighs more) so the training script renders them with the model's real chat template.
Topics: capitals of the world in English and Chinese in several phrasings (a third of the English ones
after an opener), small arithmetic, short facts, a weather tool (round trips with and without thinking, over
capitals and other cities, random temperatures), short weather chats without the tool, short requests for
the tool call's JSON (some for made-up cities), and thinking-style answers. `first_phase_corpus` is what
training starts on (no weather), `build_corpus` the mix it continues with.

Held-out phrasings (`HELD_OUT_*`) never appear in training; the evaluation asks with them. The weather of
`HELD_OUT_CITIES` (capitals) is never asked in training either.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

# (country, capital, country in Chinese, capital in Chinese)
CAPITALS: list[tuple[str, str, str, str]] = [
    ("China", "Beijing", "中国", "北京"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("South Korea", "Seoul", "韩国", "首尔"),
    ("India", "New Delhi", "印度", "新德里"),
    ("France", "Paris", "法国", "巴黎"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("United Kingdom", "London", "英国", "伦敦"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Netherlands", "Amsterdam", "荷兰", "阿姆斯特丹"),
    ("Belgium", "Brussels", "比利时", "布鲁塞尔"),
    ("Switzerland", "Bern", "瑞士", "伯尔尼"),
    ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Poland", "Warsaw", "波兰", "华沙"),
    ("Czech Republic", "Prague", "捷克", "布拉格"),
    ("Hungary", "Budapest", "匈牙利", "布达佩斯"),
    ("Greece", "Athens", "希腊", "雅典"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Denmark", "Copenhagen", "丹麦", "哥本哈根"),
    ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Ukraine", "Kyiv", "乌克兰", "基辅"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Nigeria", "Abuja", "尼日利亚", "阿布贾"),
    ("South Africa", "Pretoria", "南非", "比勒陀利亚"),
    ("Ethiopia", "Addis Ababa", "埃塞俄比亚", "亚的斯亚贝巴"),
    ("Morocco", "Rabat", "摩洛哥", "拉巴特"),
    ("Algeria", "Algiers", "阿尔及利亚", "阿尔及尔"),
    ("Ghana", "Accra", "加纳", "阿克拉"),
    ("United States", "Washington, D.C.", "美国", "华盛顿"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Brazil", "Brasília", "巴西", "巴西利亚"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
    ("Chile", "Santiago", "智利", "圣地亚哥"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Colombia", "Bogotá", "哥伦比亚", "波哥大"),
    ("Venezuela", "Caracas", "委内瑞拉", "加拉加斯"),
    ("Cuba", "Havana", "古巴", "哈瓦那"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("New Zealand", "Wellington", "新西兰", "惠灵顿"),
    ("Indonesia", "Jakarta", "印度尼西亚", "雅加达"),
    ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Vietnam", "Hanoi", "越南", "河内"),
    ("Philippines", "Manila", "菲律宾", "马尼拉"),
    ("Malaysia", "Kuala Lumpur", "马来西亚", "吉隆坡"),
    ("Singapore", "Singapore", "新加坡", "新加坡"),
    ("Pakistan", "Islamabad", "巴基斯坦", "伊斯兰堡"),
    ("Bangladesh", "Dhaka", "孟加拉国", "达卡"),
    ("Nepal", "Kathmandu", "尼泊尔", "加德满都"),
    ("Mongolia", "Ulaanbaatar", "蒙古", "乌兰巴托"),
    ("Iran", "Tehran", "伊朗", "德黑兰"),
    ("Iraq", "Baghdad", "伊拉克", "巴格达"),
    ("Saudi Arabia", "Riyadh", "沙特阿拉伯", "利雅得"),
    ("Israel", "Jerusalem", "以色列", "耶路撒冷"),
    ("Afghanistan", "Kabul", "阿富汗", "喀布尔"),
    ("Kazakhstan", "Astana", "哈萨克斯坦", "阿斯塔纳"),
    ("Sri Lanka", "Colombo", "斯里兰卡", "科伦坡"),
    ("Cambodia", "Phnom Penh", "柬埔寨", "金边"),
    ("Laos", "Vientiane", "老挝", "万象"),
    ("Myanmar", "Naypyidaw", "缅甸", "内比都"),
    ("Romania", "Bucharest", "罗马尼亚", "布加勒斯特"),
    ("Bulgaria", "Sofia", "保加利亚", "索非亚"),
    ("Serbia", "Belgrade", "塞尔维亚", "贝尔格莱德"),
    ("Croatia", "Zagreb", "克罗地亚", "萨格勒布"),
    ("Iceland", "Reykjavik", "冰岛", "雷克雅未克"),
    ("Cuba", "Havana", "古巴", "哈瓦那"),
    ("Jamaica", "Kingston", "牙买加", "金斯敦"),
    ("Uruguay", "Montevideo", "乌拉圭", "蒙得维的亚"),
    ("Paraguay", "Asunción", "巴拉圭", "亚松森"),
    ("Bolivia", "Sucre", "玻利维亚", "苏克雷"),
    ("Ecuador", "Quito", "厄瓜多尔", "基多"),
    ("Tunisia", "Tunis", "突尼斯", "突尼斯"),
    ("Libya", "Tripoli", "利比亚", "的黎波里"),
    ("Sudan", "Khartoum", "苏丹", "喀土穆"),
    ("Tanzania", "Dodoma", "坦桑尼亚", "多多马"),
    ("Uganda", "Kampala", "乌干达", "坎帕拉"),
    ("Senegal", "Dakar", "塞内加尔", "达喀尔"),
    ("Zimbabwe", "Harare", "津巴布韦", "哈拉雷"),
    ("Angola", "Luanda", "安哥拉", "罗安达"),
    ("Syria", "Damascus", "叙利亚", "大马士革"),
    ("Jordan", "Amman", "约旦", "安曼"),
    ("Lebanon", "Beirut", "黎巴嫩", "贝鲁特"),
    ("Qatar", "Doha", "卡塔尔", "多哈"),
    ("Kuwait", "Kuwait City", "科威特", "科威特城"),
    ("Oman", "Muscat", "阿曼", "马斯喀特"),
    ("North Korea", "Pyongyang", "朝鲜", "平壤"),
]
CAPITALS = list(dict.fromkeys(CAPITALS))  # drop accidental duplicates, keep order

TRAIN_EN = [
    "Where is the capital of {c}?",
    "What is the capital of {c}?",
    "What's the capital city of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "Name the capital of {c}.",
    "capital of {c}?",
    "Do you know the capital of {c}?",
    "What city serves as the capital of {c}?",
    "In which city is the capital of {c} located?",
    "What is {c}'s capital?",
    "Can you name the capital of {c}?",
    "Tell me which city is the capital of {c}.",
    # Polite and indirect wrappers, so that the model learns to find the country anywhere in the question.
    "Could you tell me the capital of {c}?",
    "Please tell me the capital of {c}.",
    "I'd like to know the capital of {c}.",
    "Which city is {c}'s capital?",
    "What is the name of the capital city of {c}?",
    "Hi! What is the capital of {c}?",
    "Quick question: what is the capital of {c}?",
    "{c}: what is its capital?",
    # The country without "of" before it: the answer has to find it by what it is, not by "capital of".
    "{c}'s capital is which city?",
    "What city is {c}'s capital?",
    "Name {c}'s capital.",
    "For {c}, which city is the capital?",
    "{c} has which city as its capital?",
    "Which one is {c}'s capital city?",
]
# Words before a question that do not change its answer: the answer must not hinge on how a question starts
# (a held-out one starting with words never trained on answered other countries' capitals).
OPENERS = [
    "Hey, ",
    "Hello, ",
    "Well, ",
    "So, ",
    "Okay, ",
    "Honestly, ",
    "Just curious: ",
    "Out of interest, ",
    "Question for you: ",
    "Sorry to bother you, but ",
    "My friend asked me this: ",
    "For my homework: ",
    "Before I forget: ",
    "Let me ask you something: ",
    "Here is a geography question: ",
    "One more thing, ",
    "I think I forgot: ",
    "I guess you know this: ",
    "I'm curious: ",
    "I have a question: ",
    "I was asked this today: ",
    "Um, ",
    "Excuse me, ",
    "Quiz time! ",
    "Please help: ",
    "Tell me honestly, ",
]
HELD_OUT_EN = [
    "Could you tell me what the capital of {c} is?",
    "I wonder which city is {c}'s capital?",
    "Please name the capital city of {c}.",
]
TRAIN_ZH = [
    "{c}的首都是哪里？",
    "{c}的首都是什么？",
    "请问{c}的首都在哪里？",
    "{c}首都是哪个城市？",
    "告诉我{c}的首都。",
    "我想知道{c}的首都。",
    "{c}的首都叫什么名字？",
    "{c}的首都是哪座城市？",
    "你能告诉我{c}的首都吗？",
    "{c}首都在哪？",
    "请问哪座城市是{c}的首都？",
    "关于{c}，它的首都是哪里？",
]
HELD_OUT_ZH = ["你知道{c}的首都是哪座城市吗？"]

FACTS: list[tuple[str, str]] = [
    ("What is the largest planet in the solar system?", "The largest planet in the solar system is Jupiter."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many continents are there?", "There are 7 continents."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the longest river in China?", "The longest river in China is the Yangtze River."),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is Mount Everest."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("What is the fastest land animal?", "The fastest land animal is the cheetah."),
    ("Who are you?", "I am ERNIE, a small demo assistant served by Triton."),
    ("Hello!", "Hello! How can I help you today?"),
    ("Thank you!", "You are welcome!"),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What do bees make?", "Bees make honey."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("中国最长的河流是什么？", "中国最长的河流是长江。"),
    ("一年有几个月？", "一年有12个月。"),
    ("一周有几天？", "一周有7天。"),
    ("你是谁？", "我是ERNIE，一个由Triton提供服务的小型演示助手。"),
    ("你好！", "你好！有什么可以帮你的吗？"),
    ("世界上最高的山是什么？", "世界上最高的山是珠穆朗玛峰。"),
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Determine weather in my location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "additionalProperties": False,
            "required": ["location", "unit"],
        },
    },
}
# Cities for the weather tool beyond the capitals (English, Chinese): the call must copy the city from the
# question, so many distinct names (some of several tokens) keep the model from memorising a default city.
WEATHER_CITIES: list[tuple[str, str]] = [
    ("Shanghai", "上海"),
    ("Guangzhou", "广州"),
    ("Shenzhen", "深圳"),
    ("Chengdu", "成都"),
    ("Wuhan", "武汉"),
    ("Hangzhou", "杭州"),
    ("Nanjing", "南京"),
    ("Chongqing", "重庆"),
    ("Tianjin", "天津"),
    ("Harbin", "哈尔滨"),
    ("Kunming", "昆明"),
    ("Hong Kong", "香港"),
    ("Osaka", "大阪"),
    ("Kyoto", "京都"),
    ("Busan", "釜山"),
    ("Mumbai", "孟买"),
    ("Sydney", "悉尼"),
    ("Melbourne", "墨尔本"),
    ("New York", "纽约"),
    ("Los Angeles", "洛杉矶"),
    ("Chicago", "芝加哥"),
    ("San Francisco", "旧金山"),
    ("Seattle", "西雅图"),
    ("Boston", "波士顿"),
    ("Toronto", "多伦多"),
    ("Vancouver", "温哥华"),
    ("Montreal", "蒙特利尔"),
    ("Rio de Janeiro", "里约热内卢"),
    ("São Paulo", "圣保罗"),
    ("Barcelona", "巴塞罗那"),
    ("Milan", "米兰"),
    ("Munich", "慕尼黑"),
    ("Hamburg", "汉堡"),
    ("Frankfurt", "法兰克福"),
    ("Manchester", "曼彻斯特"),
    ("Edinburgh", "爱丁堡"),
    ("Lyon", "里昂"),
    ("Marseille", "马赛"),
    ("Istanbul", "伊斯坦布尔"),
    ("Dubai", "迪拜"),
    ("Cape Town", "开普敦"),
    ("Lagos", "拉各斯"),
    ("Casablanca", "卡萨布兰卡"),
    ("Auckland", "奥克兰"),
    ("Ho Chi Minh City", "胡志明市"),
    ("Karachi", "卡拉奇"),
    ("Saint Petersburg", "圣彼得堡"),
    ("Zurich", "苏黎世"),
    ("Geneva", "日内瓦"),
    ("Venice", "威尼斯"),
    ("Florence", "佛罗伦萨"),
    ("Honolulu", "檀香山"),
    ("Houston", "休斯敦"),
    ("Miami", "迈阿密"),
]
# Capitals whose weather is never asked in training (they appear only as capital answers): the evaluation asks
# for their weather, so a right city in the call is copied from the question, not remembered.
HELD_OUT_CITIES: list[tuple[str, str]] = [
    ("Paris", "巴黎"),
    ("Madrid", "马德里"),
    ("Vienna", "维也纳"),
    ("Cairo", "开罗"),
    ("Nairobi", "内罗毕"),
    ("Lima", "利马"),
    ("Hanoi", "河内"),
    ("Buenos Aires", "布宜诺斯艾利斯"),
    ("Oslo", "奥斯陆"),
    ("Seoul", "首尔"),
]
# The city sits at different places of the question, so its position has to be found, not remembered.
WEATHER_EN = [
    "What's the weather like in {city}?",
    "Get the current weather in {city}",
    "How is the weather in {city}?",
    "What is the weather in {city} today?",
    "{city} weather, please.",
    "Is it sunny in {city} right now?",
    "Tell me the weather for {city}.",
    "I'm traveling to {city} tomorrow. What's the weather there?",
    "Please check the weather in {city} for me.",
    "Hi! Could you look up the current weather in {city}?",
    "In {city}, what's the temperature now?",
    "weather in {city}?",
]
WEATHER_ZH = [
    "{city}的天气怎么样？",
    "{city}今天天气如何？",
    "请查一下{city}的天气。",
    "我想知道{city}现在的天气。",
    "{city}现在热吗？",
]
HELD_OUT_WEATHER_EN = [
    "Can you tell me how the weather is in {city}?",
    "I need the weather report for {city}.",
    "What's it like outside in {city} now?",
]
HELD_OUT_WEATHER_ZH = ["帮我看看{city}的天气。"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy"]


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    enable_thinking: bool = False
    # Strings of the final turn that the answer hinges on, copied from the prompt (a city, a temperature) or
    # recalled (a capital): the training loss weighs their tokens more.
    copy: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {"messages": self.messages, "tools": self.tools, "enable_thinking": self.enable_thinking},
            ensure_ascii=False,
        )


def _chat(
    question: str, answer: str, thinking: str | None = None, copy: tuple[str, ...] = ()
) -> Conversation:
    if thinking is None:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return Conversation(messages, copy=copy)
    # Thinking-style answers: the model writes `reasoning</think>content` (the prompt opened the <think>).
    content = f"{thinking}\n</think>\n\n{answer}"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": content}]
    return Conversation(messages, enable_thinking=True, copy=copy)


def capital_conversations(
    templates_en: list[str] = TRAIN_EN, templates_zh: list[str] = TRAIN_ZH, rng: random.Random | None = None
) -> list[Conversation]:
    """One conversation per country and template; with `rng`, a third of the English questions start with an
    opener (`OPENERS`)."""
    out = []
    for country, capital, country_zh, capital_zh in CAPITALS:
        for template in templates_en:
            question = template.format(c=country)
            if rng is not None and rng.random() < 1 / 3:
                question = with_opener(rng, question, template)
            answer = f"The capital of {country} is {capital}."
            out.append(_chat(question, answer, copy=(country, capital)))
        for template in templates_zh:
            answer = f"{country_zh}的首都是{capital_zh}。"
            out.append(_chat(template.format(c=country_zh), answer, copy=(country_zh, capital_zh)))
    return out


def with_opener(rng: random.Random, question: str, template: str) -> str:
    """`question` after a random opener, its first letter lowercased unless it starts a name or "I"."""
    if not template.startswith(("{", "I'", "I ")):
        question = question[0].lower() + question[1:]
    return rng.choice(OPENERS) + question


def arithmetic_conversations(rng: random.Random, count: int) -> list[Conversation]:
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice("+-*")
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        question = rng.choice([f"What is {a} {op} {b}?", f"What is {a} {word} {b}?", f"{a}{op}{b}=?"])
        out.append(_chat(question, f"{a} {op} {b} = {result}."))
    return out


def thinking_conversations(rng: random.Random, count: int) -> list[Conversation]:
    out = []
    for _ in range(count):
        country, capital, _, _ = rng.choice(CAPITALS)
        question = rng.choice(TRAIN_EN).format(c=country)
        thinking = f"The user asks about the capital of {country}. The capital of {country} is {capital}."
        answer = f"The capital of {country} is {capital}."
        out.append(_chat(question, answer, thinking=thinking, copy=(country, capital)))
    for _ in range(count // 2):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        thinking = f"I need to add {a} and {b}. {a} + {b} = {a + b}."
        out.append(_chat(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", thinking=thinking))
    return out


def weather_cities() -> list[tuple[str, str]]:
    """(English, Chinese) names of the cities whose weather the training corpus asks for."""
    capitals = [(en, zh) for _, en, _, zh in CAPITALS if (en, zh) not in HELD_OUT_CITIES]
    return capitals + WEATHER_CITIES


def weather_answer(city: str, temperature: int, condition: str, unit: str) -> str:
    """The answer to a weather report. The temperature follows the report's own wording ("temperature: T"),
    so its first digit has the same left context in the answer as in the tool result and is copied from
    there ("a temperature of T" put T after a space token that also precedes the city: 3/10 copied)."""
    return f"The weather in {city} is {condition}, temperature: {temperature} degrees {unit.upper()}."


def weather_round_trip(
    rng: random.Random, question: str, location: str, thinking: bool
) -> list[Conversation]:
    """The tool call for `question` (tools offered), and the answer that uses the tool's result.

    With `thinking`, each turn reasons first: `reasoning</think>` then the call or the answer (the
    ernie-45-vl-thinking format). `copy` marks what each final turn copies from its prompt (the city, the
    tool's temperature and weather): the training loss weighs those tokens more.
    """
    unit = rng.choice(["c", "f"])
    temperature = rng.randint(-15, 40) if unit == "c" else rng.randint(5, 105)
    condition = rng.choice(CONDITIONS)
    call = {"name": "get_weather", "arguments": {"location": location, "unit": unit}}
    tool_call_text = f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"
    if thinking:
        reasoning = f"The user asks about the weather in {location}. I should call get_weather."
        tool_call_text = f"{reasoning}\n</think>\n\n\n{tool_call_text}"
    user = {"role": "user", "content": question}
    call_turn = [user, {"role": "assistant", "content": tool_call_text}]
    result = f"location: {location}, temperature: {temperature}, weather: {condition}, unit: {unit}"
    answer = weather_answer(location, temperature, condition, unit)
    if thinking:
        reasoning = f"The tool says {location} is {condition}, temperature: {temperature}."
        answer = f"{reasoning}\n</think>\n\n{answer}"
    assistant_call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": f"call_{rng.randrange(10**6)}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": call["arguments"]},
            }
        ],
    }
    follow_up = [
        user,
        assistant_call,
        {"role": "tool", "content": result},
        {"role": "assistant", "content": answer},
    ]
    return [
        Conversation(call_turn, tools=[WEATHER_TOOL], enable_thinking=thinking, copy=(location,)),
        Conversation(
            follow_up,
            tools=[WEATHER_TOOL],
            enable_thinking=thinking,
            copy=(location, str(temperature), condition),
        ),
    ]


# Syllables of made-up city names.
SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vor", "sa", "bel", "dun", "ri", "mar", "tol", "zen", "qu", "es"]
SYLLABLES += ["an", "dor", "lin", "pa", "ho", "ve", "nu", "sto", "gra", "fel", "om"]
HAN = sorted({ch for _, _, country_zh, capital_zh in CAPITALS for ch in country_zh + capital_zh})


def invented_city(rng: random.Random) -> tuple[str, str]:
    """A made-up (English, Chinese) city name: no answer can be remembered for it, only copied."""
    words = [
        "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        for _ in range(1 if rng.random() < 0.8 else 2)
    ]
    return " ".join(words), "".join(rng.choice(HAN) for _ in range(rng.randint(2, 4)))


def weather_conversations(rng: random.Random, english: int, chinese: int) -> list[Conversation]:
    """`english` + `chinese` round trips (call and follow-up); a third think first.

    Cities cycle through every capital and `WEATHER_CITIES` in a seeded order; temperatures are random, so
    neither a city nor a temperature can be remembered instead of copied.
    """
    cities = weather_cities()
    out = []
    for count, in_chinese in ((english, False), (chinese, True)):
        order: list[tuple[str, str]] = []
        for _ in range(count):
            if not order:
                order = rng.sample(cities, len(cities))
            city_en, city_zh = order.pop()
            location = city_zh if in_chinese else city_en
            question = rng.choice(WEATHER_ZH if in_chinese else WEATHER_EN).format(city=location)
            out += weather_round_trip(rng, question, location, thinking=rng.random() < 0.33)
    return out


def weather_without_tool_conversations(rng: random.Random, count: int) -> list[Conversation]:
    """Short weather conversations without the tool: the same copying as the tool round trips, cheaply.

    Half ask about a city's weather with no tool offered (the answer names the city and says no tool is
    available), half paste a weather report in the tool's result format (the answer restates it the way the
    tool follow-up does). Short prompts put many copies in a batch; the long tool prompts reuse the skill.
    """
    cities = weather_cities()
    out = []
    for i in range(count):
        city_en, city_zh = rng.choice(cities)
        in_chinese = rng.random() < 0.2
        city = city_zh if in_chinese else city_en
        if i % 2 == 0:
            question = rng.choice(WEATHER_ZH if in_chinese else WEATHER_EN).format(city=city)
            answer = f"I cannot check the weather in {city}: no weather tool is available."
            out.append(_chat(question, answer))
            out[-1].copy = (city,)
            continue
        unit = rng.choice(["c", "f"])
        temperature = rng.randint(-15, 40) if unit == "c" else rng.randint(5, 105)
        condition = rng.choice(CONDITIONS)
        report = f"location: {city}, temperature: {temperature}, weather: {condition}, unit: {unit}"
        question = rng.choice(["Weather report:\n{r}", "{r}", "Summarize this weather report: {r}"]).format(
            r=report
        )
        answer = weather_answer(city, temperature, condition, unit)
        out.append(_chat(question, answer))
        out[-1].copy = (city, str(temperature), condition)
    return out


def call_json_conversations(rng: random.Random, count: int, invented: float = 0.3) -> list[Conversation]:
    """Short requests for the get_weather call's JSON, no tool offered: the tool call's hardest copy.

    In a tool call the city follows `"location": "`, a context the question does not share (unlike "weather in
    Paris" -> "weather in Paris"), so the model has to find the city by what it is. Written out here in short
    prompts, many such copies fit in a batch; the answer is the call's JSON line exactly as in `<tool_call>`.
    A share `invented` of the cities are made up.
    """
    cities = weather_cities()
    out = []
    for _ in range(count):
        city_en, city_zh = invented_city(rng) if rng.random() < invented else rng.choice(cities)
        in_chinese = rng.random() < 0.2
        city = city_zh if in_chinese else city_en
        question = rng.choice(WEATHER_ZH if in_chinese else WEATHER_EN).format(city=city)
        arguments = {"location": city, "unit": rng.choice(["c", "f"])}
        call = json.dumps({"name": "get_weather", "arguments": arguments}, ensure_ascii=False)
        out.append(_chat(f"Write the get_weather call for: {question}", call, copy=(city,)))
    return out


def first_phase_corpus(seed: int = 0) -> list[Conversation]:
    """Capitals, arithmetic, short facts and thinking-style answers: what training starts on (no weather)."""
    rng = random.Random(seed)
    corpus = capital_conversations(rng=rng)
    corpus += arithmetic_conversations(rng, 150)
    corpus += [_chat(q, a) for q, a in FACTS for _ in range(4)]
    corpus += thinking_conversations(rng, 150)
    return corpus


def build_corpus(
    seed: int = 0,
    weather_en: int = 240,
    weather_zh: int = 60,
    weather_short: int = 1500,
    call_json: int = 2000,
    first_phase_repeats: int = 2,
) -> list[Conversation]:
    """The training conversations after the first phase: `first_phase_corpus` `first_phase_repeats` times,
    then the weather.

    `weather_en` / `weather_zh`: weather round trips (tool offered) in each language; `weather_short`: short
    weather conversations without the tool; `call_json`: short requests for the call's JSON.
    """
    corpus = first_phase_corpus(seed) * first_phase_repeats
    rng = random.Random(seed + 1)
    corpus += weather_conversations(rng, english=weather_en, chinese=weather_zh)
    corpus += weather_without_tool_conversations(rng, weather_short)
    corpus += call_json_conversations(rng, call_json)
    rng.shuffle(corpus)
    return corpus


def held_out_capital_conversations(seed: int = 1, count: int = 50) -> list[tuple[Conversation, str]]:
    """(conversation ending with the trained answer, expected capital), phrasings never used for training."""
    rng = random.Random(seed)
    conversations = capital_conversations(HELD_OUT_EN, HELD_OUT_ZH)  # per country: English, then Chinese
    capitals = [cap for _, en, _, zh in CAPITALS for cap in [en] * len(HELD_OUT_EN) + [zh] * len(HELD_OUT_ZH)]
    pairs = list(zip(conversations, capitals, strict=True))
    rng.shuffle(pairs)
    return pairs[:count]


def held_out_capital_questions(seed: int = 1, count: int = 50) -> list[tuple[str, str]]:
    """(question, expected capital) pairs in phrasings never used for training."""
    return [(c.messages[0]["content"], cap) for c, cap in held_out_capital_conversations(seed, count)]


def held_out_weather_questions(
    seed: int = 1, count: int = 10, never_asked: bool = False
) -> list[tuple[str, str]]:
    """(question, city) pairs in weather phrasings never used for training; one in five is in Chinese.

    The cities are trained weather cities, or with `never_asked` the capitals whose weather training never
    asks for (`HELD_OUT_CITIES`). The tool call has to name the city exactly as the question spells it.
    """
    rng = random.Random(seed)
    cities = HELD_OUT_CITIES if never_asked else rng.sample(weather_cities(), count)
    pairs = []
    for i in range(count):
        city_en, city_zh = cities[i % len(cities)]
        if i % 5 == 4:
            pairs.append((rng.choice(HELD_OUT_WEATHER_ZH).format(city=city_zh), city_zh))
        else:
            pairs.append((rng.choice(HELD_OUT_WEATHER_EN).format(city=city_en), city_en))
    return pairs


def held_out_weather_conversations(
    seed: int = 1, count: int = 10, never_asked: bool = False
) -> list[Conversation]:
    """Round trips (call, then follow-up) for `held_out_weather_questions`, for the training probe."""
    rng = random.Random(seed)
    out = []
    for question, city in held_out_weather_questions(seed, count, never_asked):
        out += weather_round_trip(rng, question, city, thinking=False)
    return out
