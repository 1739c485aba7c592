"""GET /v1/fine_tuning/jobs?metadata[key]=value (OpenAI's list filter) and metadata=null, with the same
cursor pagination as the unfiltered list, over real HTTP."""
import openai

from lnserver import TRAIN_JSONL


def listing(api, server, **params):
    r = api.get(server.url("/v1/fine_tuning/jobs"), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_metadata_filter_matches_every_pair_and_pages_with_the_cursor(steady_server):
    server = steady_server
    key, other_key = server.create_key("proj-a"), server.create_key("proj-b")
    f = server.upload(key, TRAIN_JSONL)
    metas = [{"team": "nlp", "run": "1"}, {"team": "vision"}, None, {"team": "nlp", "run": "2", "my key": "a b&c"},
             {}, {"team": "NLP"}, {"team": "nlp", "run": "3"}]
    ids = []
    for m in metas:
        spec = {"model": "tiny-llama", "training_file": f["id"]}
        if m is not None:
            spec["metadata"] = m
        ids.append(server.create_job(key, **spec)["id"])
    g = server.upload(other_key, TRAIN_JSONL)
    foreign = server.create_job(other_key, model="tiny-llama", training_file=g["id"], metadata={"team": "nlp"})["id"]
    api = server.client(key)

    nlp = listing(api, server, **{"metadata[team]": "nlp"})
    assert [j["id"] for j in nlp["data"]] == [ids[6], ids[3], ids[0]]  # newest first, exact match, own project
    assert foreign not in [j["id"] for j in nlp["data"]] and not nlp["has_more"]
    assert all(j["metadata"]["team"] == "nlp" for j in nlp["data"])
    # Every pair must match; keys and values are taken as given (URL-decoded).
    both = listing(api, server, **{"metadata[team]": "nlp", "metadata[run]": "2"})
    assert [j["id"] for j in both["data"]] == [ids[3]]
    odd = listing(api, server, **{"metadata[my key]": "a b&c"})
    assert [j["id"] for j in odd["data"]] == [ids[3]]
    none = listing(api, server, **{"metadata[team]": "robotics"})
    assert none["data"] == [] and none["has_more"] is False
    assert listing(api, server, **{"metadata[team]": "nlp", "metadata[absent]": "x"})["data"] == []
    # metadata=null: the jobs without metadata (none given, or {}).
    bare = listing(api, server, metadata="null")
    assert [j["id"] for j in bare["data"]] == [ids[4], ids[2]]

    # The cursor pages the filtered list: limit 1, then after=last_id, until has_more is false.
    seen, after = [], None
    while True:
        params = {"metadata[team]": "nlp", "limit": 1}
        if after:
            params["after"] = after
        page = listing(api, server, **params)
        assert len(page["data"]) == 1
        seen.append(page["data"][0]["id"])
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == [ids[6], ids[3], ids[0]]
    # The cursor may be a job the filter does not match: the page starts after it.
    mid = listing(api, server, **{"metadata[team]": "nlp", "after": ids[5]})
    assert [j["id"] for j in mid["data"]] == [ids[3], ids[0]]
    # With the status filter too.
    api.post(server.url(f"/v1/fine_tuning/jobs/{ids[0]}/cancel"))
    cancelled = listing(api, server, **{"metadata[team]": "nlp", "status": "cancelled"})
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]


def test_malformed_metadata_filters_are_400_naming_the_parameter(steady_server):
    server = steady_server
    key = server.create_key("proj-a")
    api = server.client(key)
    cases = [({"metadata": "yes"}, "metadata"),
             ({"metadata[]": "x"}, "metadata[]"),
             ({"metadata[team": "x"}, "metadata[team"),
             ({"metadata[" + "k" * 65 + "]": "x"}, "metadata[" + "k" * 65 + "]"),
             ({"metadata[team]": "v" * 513}, "metadata[team]"),
             ({f"metadata[k{i}]": "v" for i in range(17)}, None)]
    for params, param in cases:
        r = api.get(server.url("/v1/fine_tuning/jobs"), params=params)
        assert r.status_code == 400, (params, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_parameter" and err["param"].startswith("metadata"), err
        if param:
            assert err["param"] == param[:79] and param[:20] in err["message"], err
    # 16 pairs is the limit, not an error.
    ok = api.get(server.url("/v1/fine_tuning/jobs"), params={f"metadata[k{i}]": "v" for i in range(16)})
    assert ok.status_code == 200 and ok.json()["data"] == []


def test_openai_sdk_lists_by_metadata_across_pages(steady_server):
    """The OpenAI SDK's own metadata argument and auto-pagination (after = the last id of a page)."""
    server = steady_server
    key = server.create_key("sdk")
    client = openai.OpenAI(api_key=key, base_url=server.url("/v1"), max_retries=0)
    f = server.upload(key, TRAIN_JSONL)
    tagged = []
    for i in range(5):
        meta = {"team": "nlp"} if i % 2 == 0 else {"team": "vision"}
        job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f["id"], metadata=meta)
        if i % 2 == 0:
            tagged.append(job.id)
    seen = [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "nlp"}, limit=1)]
    assert seen == tagged[::-1]
    first = client.fine_tuning.jobs.list(metadata={"team": "nlp"}, limit=2)
    assert [j.id for j in first.data] == tagged[::-1][:2] and first.has_more
