"""Chat formatting and loss masks against transformers' apply_chat_template.

The llama3 and llama2 chat templates (Meta's strings, with `{% generation %}` marking what an
assistant turn trains and weight-0 turns left outside it) are set in a tokenizer_config.json next
to the real LLaMA tokenizer.json fixtures; transformers renders, tokenizes and returns the
assistant mask, and `loranull tokenize` must give the same input_ids and labels (-100 off the mask).
Also: prompt/completion and text lines, and one error message per malformed-line case."""
import json
import os
import pathlib
import random
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "tokenizers"
LORANULL = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin")) / "loranull"

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' and ('weight' not in message or message['weight'] != 0) %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' }}"
    "{% if 'weight' not in message or message['weight'] != 0 %}"
    "{% generation %}{{ content.strip() + ' ' + eos_token }}{% endgeneration %}"
    "{% else %}{{ content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endif %}{% endfor %}"
)

FAMILIES = {
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>"),
}

PIECES = [
    "Hello", "world", "What is 2+2?", "It's 4.", "日本語で答えて", "Привет", "🚀🔥", "  spaced  ", "\n\nnew lines\n",
    "def f(x):\n    return x * 2", "naïve café", "1234567", "A", "?", "don't", "Tab\there", " lead", "trail ",
    "<3 html <b>bold</b>", "x\u00a0y", "مرحبا",
]


def _text(rng):
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))


def conversations(seed, n, alternate):
    """Multi-turn chats, some with a system prompt, with weight-0 assistant turns; at least one
    assistant turn trains."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": _text(rng)})
        turns = rng.randint(1, 4)
        for _ in range(turns):
            msgs.append({"role": "user", "content": _text(rng)})
            m = {"role": "assistant", "content": _text(rng)}
            r = rng.random()
            if r < 0.3:
                m["weight"] = 0
            elif r < 0.45:
                m["weight"] = 1
            msgs.append(m)
        if not alternate and rng.random() < 0.2:  # llama3 takes any order, e.g. two user turns
            msgs.insert(len(msgs) - 1, {"role": "user", "content": _text(rng)})
        if all(m.get("weight", 1) == 0 for m in msgs if m["role"] == "assistant"):
            continue
        out.append({"messages": msgs})
    return out


def model_dir(tmp_path, family):
    template, bos, eos = FAMILIES[family]
    d = tmp_path / family
    d.mkdir()
    (d / "tokenizer.json").symlink_to(FIXTURES / family / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "chat_template": template, "clean_up_tokenization_spaces": False}))
    return d


def run_tokenize(model, data, *extra):
    r = subprocess.run([str(LORANULL), "tokenize", "--model", str(model), "--data", str(data), *extra],
                       capture_output=True, text=True, timeout=300)
    return r


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["llama3", "llama2"])
def test_chat_ids_and_masks_equal_transformers(tmp_path, transformers, family):
    d = model_dir(tmp_path, family)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    convs = conversations(seed=7 if family == "llama3" else 8, n=150, alternate=family == "llama2")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
    r = run_tokenize(d, data, "--chat-template", family)
    assert r.returncode == 0, r.stderr
    ours = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(ours) == len(convs)
    weight0_seen = 0
    for conv, mine in zip(convs, ours):
        out = hf.apply_chat_template(conv["messages"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        assert mine["input_ids"] == ids, conv
        want = [t if m else -100 for t, m in zip(ids, mask)]
        assert mine["labels"] == want, conv
        weight0_seen += any(m.get("weight") == 0 for m in conv["messages"])
    assert weight0_seen > 10
    # the template is also found from tokenizer_config.json without --chat-template
    r2 = run_tokenize(d, data)
    assert r2.returncode == 0 and r2.stdout == r.stdout


def test_every_assistant_turn_trains_and_prompts_never(tmp_path):
    d = model_dir(tmp_path, "llama3")
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"},
                         {"role": "assistant", "content": "Hello again", "weight": 0},
                         {"role": "user", "content": "Once more"}, {"role": "assistant", "content": "Bye"}]}
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(conv) + "\n")
    r = run_tokenize(d, data)
    assert r.returncode == 0, r.stderr
    ex = json.loads(r.stdout)
    hf = __import__("tokenizers").Tokenizer.from_file(str(d / "tokenizer.json"))
    trained = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert hf.decode(trained, skip_special_tokens=False) == "Hello<|eot_id|>Bye<|eot_id|>"


def test_prompt_completion_and_text(tmp_path):
    d = model_dir(tmp_path, "llama3")
    hf = __import__("tokenizers").Tokenizer.from_file(str(d / "tokenizer.json"))
    data = tmp_path / "pc.jsonl"
    data.write_text(json.dumps({"prompt": "Q: capital of France?\nA:", "completion": " Paris"}) + "\n" +
                    json.dumps({"text": "Plain text, trained everywhere."}) + "\n")
    r = run_tokenize(d, data)
    assert r.returncode == 0, r.stderr
    pc, tx = [json.loads(x) for x in r.stdout.splitlines()]
    full = hf.encode("Q: capital of France?\nA: Paris").ids  # BOS from the post-processor
    assert pc["input_ids"] == full + [128009]  # + EOS (<|eot_id|> from tokenizer_config.json)
    n_prompt = len(hf.encode("Q: capital of France?\nA:").ids)
    assert pc["labels"][:n_prompt] == [-100] * n_prompt
    assert pc["labels"][n_prompt:] == pc["input_ids"][n_prompt:]
    assert tx["input_ids"] == hf.encode("Plain text, trained everywhere.").ids
    assert tx["labels"] == tx["input_ids"]
    s = run_tokenize(d, data, "--stats")
    stats = json.loads(s.stdout)
    assert stats == {"examples": 2, "tokens": len(pc["input_ids"]) + len(tx["input_ids"]),
                     "trained_tokens": (len(pc["input_ids"]) - n_prompt) + len(tx["input_ids"]) - 1,
                     "truncated": 0}


MALFORMED = [
    ('{"messages": [{"role": "user", "content": "hi"}', "bad JSON"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', 'messages[0].role": unknown role "bot"'),
    ('{"messages": [{"role": "user"}]}', 'messages[0].content" is missing'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',
     'messages[1].content": empty assistant reply'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}',
     'messages[1].weight" must be 0 or 1'),
    ('{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}',
     'messages[0].weight": only assistant turns'),
    ('{"messages": []}', '"messages" is empty'),
    ('{"messages": "hi"}', '"messages" must be an array'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}',
     "no token that the loss trains on"),
    ('{"prompt": "q", "completion": ""}', '"completion" is empty'),
    ('{"prompt": "q", "completion": 3}', '"completion" must be a string'),
    ('{"prompt": "q"}', '"completion" is missing'),
    ('{"text": ""}', '"text" is empty'),
    ('{"input_ids": [1, "a"]}', '"input_ids[1]" must be an integer'),
    ('{"input_ids": [1, 999999999]}', '"input_ids[1]" = 999999999 is outside the vocabulary'),
    ('{"hello": 1}', "no known field"),
    ('["not", "an", "object"]', "must be a JSON object"),
    ('{"text": "' + "word " * 400 + '"}', "longer than max_seq_len 64"),
]


@pytest.mark.parametrize("line,want", MALFORMED, ids=[w for _, w in MALFORMED])
def test_malformed_line_names_line_and_field(tmp_path, line, want):
    d = model_dir(tmp_path, "llama3")
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    for bad_at in (1, 4):
        lines = [good] * 5
        lines[bad_at - 1] = line
        data = tmp_path / f"bad{bad_at}.jsonl"
        data.write_text("\n".join(lines) + "\n")
        r = run_tokenize(d, data, "--max-seq-len", "64")
        assert r.returncode == 1
        assert f"bad{bad_at}.jsonl line {bad_at}: " in r.stderr, r.stderr
        assert want in r.stderr, r.stderr


def test_llama2_roles_must_alternate(tmp_path):
    d = model_dir(tmp_path, "llama2")
    data = tmp_path / "alt.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                             {"role": "assistant", "content": "c"}]}) + "\n")
    r = run_tokenize(d, data)
    assert r.returncode == 1
    assert 'line 1: field "messages[1].role": the llama2 template needs user and assistant turns to alternate' in r.stderr


def test_truncate_policy_counts(tmp_path):
    d = model_dir(tmp_path, "llama3")
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "word " * 100}) + "\n" + json.dumps({"text": "short"}) + "\n" +
                    json.dumps({"text": "word " * 80}) + "\n")
    r = run_tokenize(d, data, "--max-seq-len", "32")
    assert r.returncode == 1 and "2 bad lines in all, 2 of them longer than max_seq_len" in r.stderr
    r = run_tokenize(d, data, "--max-seq-len", "32", "--truncate", "--stats")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["truncated"] == 2
    assert json.loads(r.stdout)["tokens"] == 32 + 2 + 32


def test_packing_equals_transformers_flattening_collator(tmp_path, transformers):
    """`loranull tokenize --pack N` rows = transformers' DataCollatorWithFlattening over the same
    examples: ids concatenated, labels with each example's first token -100, positions restarting,
    and seq_idx = our segment."""
    d = model_dir(tmp_path, "llama3")
    convs = conversations(seed=11, n=40, alternate=False)
    data = tmp_path / "pack.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
    plain = run_tokenize(d, data)
    assert plain.returncode == 0, plain.stderr
    examples = [json.loads(x) for x in plain.stdout.splitlines()]
    cap = max(len(e["input_ids"]) for e in examples) + 40
    r = run_tokenize(d, data, "--pack", str(cap))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert sum(row["examples"] for row in rows) == len(examples)
    assert len(rows) < len(examples)  # something was packed together
    collator = transformers.DataCollatorWithFlattening(return_position_ids=True, return_seq_idx=True)
    k = 0
    for row in rows:
        feats = examples[k:k + row["examples"]]
        k += row["examples"]
        want = collator(feats, return_tensors="np")
        assert row["input_ids"] == want["input_ids"][0].tolist()
        assert row["labels"] == want["labels"][0].tolist()
        assert row["position_ids"] == want["position_ids"][0].tolist()
        assert row["segment"] == want["seq_idx"][0].tolist()
        assert len(row["input_ids"]) <= cap
        if k < len(examples):  # greedy: the next example did not fit
            assert len(row["input_ids"]) + len(examples[k]["input_ids"]) > cap
