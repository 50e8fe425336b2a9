"""Every model family, end to end, against what the model itself computes.

For each family in ``ADAPTERS`` a tiny random checkpoint (3 decoder layers) is built once per
module, one run with every condition is extracted from 12 synthetic samples of two image sizes
(64x64 and 96x64, so Qwen's dynamic resolution makes the visual spans ragged), and the store is
checked with exact equality wherever the arithmetic allows:

1. token sites: visual span = the run of image tokens, as long as what the vision tower inserts;
   instruction = the question's last token; prediction = the last prompt token; the
   teacher-forced answer follows it;
2. cached states are bit-for-bit ``hidden_states[i]`` of a plain forward of the same batch
   (Qwen3-VL: plus the deepstack add at the visual positions of the deepstack layers), and index
   ``n_layers`` is the last decoder layer's output before the final norm;
3. gold and candidate log-probs equal a plain forward of prompt + answer;
4. ``truncated``: layers 0..L read real visual states, layers > L zeros (``zero``) or no visual
   keys for text queries (``drop``);
5. blind conditions feed the images DESIGN.md describes, with the same token layout.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402

from gapcache.conditions import strategies_of  # noqa: E402
from gapcache.config import ModelConfig, load_config  # noqa: E402
from gapcache.extract.models import ADAPTERS, get_adapter  # noqa: E402
from gapcache.extract.runner import Extraction  # noqa: E402
from gapcache.extract.tiny import build_tiny_checkpoint  # noqa: E402
from gapcache.store import open_store, visual_span  # noqa: E402
from gapcache.store.schema import SITES, STATUS_DONE  # noqa: E402
from helpers import allowed_keys, assert_greedy_under_truncation, ragged_samples  # noqa: E402
from test_tiny import n_visual_features  # noqa: E402

pytestmark = pytest.mark.integration

FAMILIES = tuple(ADAPTERS)
N_LAYERS = 3
N_SAMPLES = 12
BATCH = 4
TRUNC_LAYERS = (-1, 0, 1, N_LAYERS - 1)
STRATEGIES = strategies_of("truncated")  # every registered truncation strategy
VISUAL_CONDITIONS = ("original", "blind_black", "blind_mean", "blind_randomimage")
# both attention paths: `drop` rewrites the eager float mask and the SDPA mask
ATTN = {"llava": "eager", "qwen2_vl": "sdpa", "qwen2_5_vl": "eager", "qwen3_vl": "sdpa", "qwen3_vl_moe": "eager"}
WIDE = (96, 64)  # odd samples get this size; 64x64 -> 16 Qwen visual tokens, 96x64 -> 24
QWEN_TOKENS = {(64, 64): 16, WIDE: 24}
I_INSTR, I_PRED = SITES.index("instruction"), SITES.index("prediction")


# --------------------------------------------------------------------------- the run, once per family


def make_samples():
    return ragged_samples(N_SAMPLES, WIDE)



@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory, one_thread):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("GAPCACHE_CACHE", str(tmp / "cache"))
        path = build_tiny_checkpoint(family, tmp / "ckpt", seed=0, num_layers=N_LAYERS)
        mcfg = dict(family=family, id=str(path), dtype="float32", attn_implementation=ATTN[family])
        model, processor = get_adapter(family).load(ModelConfig(**mcfg))
        cfg = load_config({
            "model": mcfg,
            "data": {"dataset": "synthetic", "options": {"n": N_SAMPLES, "image_size": 64}},
            "extract": {"conditions": ["original", "blind_black", "blind_mean", "blind_randomimage", "truncated"],
                        "truncation_layers": list(TRUNC_LAYERS), "truncation_strategies": list(STRATEGIES),
                        "batch_size": BATCH, "samples_per_shard": 8, "max_length": 512, "seed": 3},
        })
        samples = make_samples()
        ex = Extraction(cfg, tmp / "out", model=model, processor=processor)
        ex.load()
        ex.plan(samples, show=False)
        ex.run(show=False)
        ds = open_store(ex.store_path)
        labels = [str(c) for c in ds.condition.values]
        yield SimpleNamespace(
            family=family, ex=ex, model=model, processor=processor, tok=processor.tokenizer, samples=samples,
            ds=ds, adapter=get_adapter(family), cond={c.label: c for c in ex.conditions}, ci=labels.index,
            vci=[str(c) for c in ds.visual_condition.values].index,
            text=ds.text_states.values, vis=ds.visual_states.values,  # small: load once
            site=ds.site_position.values, vstart=ds.visual_start.values,
            voff=ds.visual_offset.values, vlen=ds.visual_length.values,
        )


def test_instruction_site_on_trailing_spaces_and_on_a_question_equal_to_the_template(run):
    """On each family's tokenizer: trailing spaces never become the instruction site, and a question
    ``assistant`` (Qwen's template says ``<|im_start|>assistant``) keeps the site in the user turn."""
    r = run
    tail_expected = " ASSISTANT:" if r.family == "llava" else "<|im_end|>\n<|im_start|>assistant\n"
    base = r.samples[0]
    for question, last in (("Is the sky blue?   ", "?"), ("Is the sky blue?\n\t ", "?"), ("assistant", "t")):
        p = r.ex.planner.plan(0, dataclasses.replace(base, question=question))
        assert p.ok, p.failure
        ids, i = p.prompt_ids, p.instruction
        piece = r.tok.decode([ids[i]])
        assert piece.strip() and piece.rstrip().endswith(last), (question, piece)
        assert r.tok.decode(ids[: i + 1]).rstrip().endswith(question.rstrip())
        assert r.tok.decode(ids[i + 1 :]).strip() == tail_expected.strip()  # only whitespace and the template
        assert p.prediction == len(ids) - 1 and i < p.prediction


def run_batches(r):
    """The runner's exact batching: shards of samples_per_shard, then batch_size rows of the ok ones."""
    e = r.ex.cfg.extract
    out = []
    for s0 in range(0, len(r.ex.planned), e.samples_per_shard):
        idx = [i for i in range(s0, min(s0 + e.samples_per_shard, len(r.ex.planned))) if r.ex.planned[i].ok]
        out += [idx[b : b + e.batch_size] for b in range(0, len(idx), e.batch_size)]
    return out


def question_prompt(r, question):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return r.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def answer_ids(r, text):
    return r.tok(r.adapter.answer_prefix + text, add_special_tokens=False)["input_ids"]




def reference_forward(r, indices, cond):
    """Plain forward of the runner's own batch: hidden_states and the last layer's raw output."""
    inputs = r.ex.batch_inputs(indices, cond)
    layers = r.adapter.decoder_layers(r.model)
    last = {}

    def grab(module, args, output):
        last["out"] = output[0] if isinstance(output, tuple) else output
        return None

    handle = layers[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = r.model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return inputs, out, last["out"]


def deepstack_features(r, inputs):
    """Qwen3-VL: per deepstack level, the features added at the visual positions (batch order)."""
    with torch.no_grad():
        feats = r.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return [torch.cat(list(level), 0) for level in feats.deepstack_features]


def plain_logprobs(r, i, image=None, answer=None):
    """log_softmax of a batch-1 forward of sample i's prompt + gold answer (or ``answer``; no padding, no runner)."""
    p, s = r.ex.planned[i], r.samples[i]
    image = s.load_image() if image is None else image
    inputs = r.processor(text=[question_prompt(r, s.question)], images=[image], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ans = torch.tensor([answer_ids(r, s.answer if answer is None else answer)])
    for key in list(inputs):
        v = inputs[key]
        if torch.is_tensor(v) and v.shape[:2] == (1, n):
            fill = {"input_ids": ans, "attention_mask": torch.ones_like(ans)}.get(key, torch.zeros_like(ans))
            inputs[key] = torch.cat([v, fill.to(v.dtype)], 1)
    with torch.no_grad():
        out = r.model(**inputs, use_cache=False, output_hidden_states=True)
    assert n == len(p.prompt_ids)
    return torch.log_softmax(out.logits[0].double(), -1), n, out.hidden_states


# --------------------------------------------------------------------------- 1. token sites


def test_run_completed_every_condition(run):
    r = run
    assert all(p.ok for p in r.ex.planned), [p.failure for p in r.ex.planned if not p.ok]
    assert (r.ds.status.values == STATUS_DONE).all(), r.ds.error.values[r.ds.status.values != STATUS_DONE]
    expected = ["original", "blind_black", "blind_mean", "blind_randomimage"] + [
        f"truncated_{s}_L{'m1' if L < 0 else L}" for s in STRATEGIES for L in TRUNC_LAYERS]
    assert [str(c) for c in r.ds.condition.values] == expected
    assert [int(x) for x in r.ds.layer.values] == list(range(N_LAYERS + 1))
    assert r.ds.attrs["model"]["n_layers"] == N_LAYERS


def test_sites_point_at_the_right_tokens(run):
    r = run
    tok, image_id = r.tok, int(r.model.config.image_token_id)
    special = set(tok.all_special_ids)
    tail_expected = " ASSISTANT:" if r.family == "llava" else "<|im_end|>\n<|im_start|>assistant\n"
    for i, (p, s) in enumerate(zip(r.ex.planned, r.samples)):
        prompt = question_prompt(r, s.question)
        assert p.prompt == prompt
        batch = r.processor(text=[prompt], images=[s.load_image()], return_tensors="pt")
        ids = batch["input_ids"][0].tolist()
        assert p.prompt_ids == ids
        assert int(r.ds.seq_len[i]) == len(ids)

        # visual: exactly the run of image tokens, as long as what the vision tower inserts
        pos = np.flatnonzero(np.array(ids) == image_id)
        assert pos.size and np.array_equal(pos, np.arange(pos[0], pos[0] + pos.size))
        assert (int(r.vstart[i]), int(r.vlen[i]), int(r.ds.span_length[i])) == (pos[0], pos.size, pos.size)
        assert pos.size == n_visual_features(r.model, batch)
        if r.family == "llava":
            assert pos.size == 16
        else:
            assert pos.size == QWEN_TOKENS[s.load_image().size]
            assert ids[pos[0] - 1] == r.model.config.vision_start_token_id
            assert ids[pos[-1] + 1] == r.model.config.vision_end_token_id

        # instruction: the question's last piece, nothing of the question after it
        instr, pred = (int(x) for x in r.site[i])
        assert (instr, pred) == (p.instruction, p.prediction)
        assert ids[instr] not in special and ids[instr] != image_id
        assert s.question.endswith("?") and tok.decode([ids[instr]]) == "?"
        assert tok.decode(ids[: instr + 1]).endswith(s.question)
        assert tok.decode(ids[instr + 1 :]) == prompt[prompt.rindex(s.question) + len(s.question) :] == tail_expected

        # prediction: the last prompt token, the end of the generation prompt
        assert pred == len(ids) - 1
        assert tok.decode(ids[: pred + 1]).endswith("ASSISTANT:" if r.family == "llava" else "<|im_start|>assistant\n")

    # the teacher-forced sequence continues with the answer right after the prediction site
    orig = r.cond["original"]
    for batch in run_batches(r):
        inputs = r.ex.batch_inputs(batch, orig)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for row, i in enumerate(batch):
            p, s = r.ex.planned[i], r.samples[i]
            pred, ans = p.prediction, answer_ids(r, s.answer)
            assert ans == p.answer_ids and int(r.ds.gold_ntokens[i]) == len(ans)
            assert ids[row, : pred + 1].tolist() == p.prompt_ids
            assert ids[row, pred + 1 : pred + 1 + len(ans)].tolist() == ans
            assert tok.decode(ans) == r.adapter.answer_prefix + s.answer
            assert mask[row, : pred + 1 + len(ans)].all() and not mask[row, pred + 1 + len(ans) :].any()
            assert (ids[row, pred + 1 + len(ans) :] == tok.pad_token_id).all()


def test_ragged_visual_spans(run):
    r = run
    sizes = [s.load_image().size for s in r.samples]
    if r.family == "llava":
        assert set(r.vlen.tolist()) == {16}
    else:
        assert r.vlen.tolist() == [QWEN_TOKENS[sz] for sz in sizes]
        assert set(r.vlen.tolist()) == {16, 24}
    # offsets: disjoint, in sample order, and the vtoken coordinates name their owner
    ends = r.voff + r.vlen
    assert (r.voff[1:] >= ends[:-1]).all()
    owner = r.ds.vtoken_sample.values
    tpos = r.ds.vtoken_position.values
    for i in range(N_SAMPLES):
        a, b = int(r.voff[i]), int(ends[i])
        assert (owner[a:b] == i).all() and np.array_equal(tpos[a:b], np.arange(b - a))
        assert visual_span(r.ds, r.samples[i].id).sizes["vtoken"] == r.vlen[i]
    assert (owner >= 0).sum() == r.vlen.sum()


# --------------------------------------------------------------------------- 2. bit-for-bit


@pytest.mark.parametrize("label", VISUAL_CONDITIONS)
def test_states_bit_for_bit(run, label):
    r = run
    cond, ci, vci = r.cond[label], r.ci(label), r.vci(label)
    deepstack = bool(r.adapter.deepstack_layers(r.model))
    norm = r.adapter.final_norm(r.model)
    for batch in run_batches(r):
        inputs, out, last = reference_forward(r, batch, cond)
        hs = out.hidden_states
        assert len(hs) == N_LAYERS + 1
        # convention: hidden_states[-1] is after the final norm; the store keeps the input of the norm
        with torch.no_grad():
            assert torch.equal(hs[-1], norm(last))
        ds_feats = deepstack_features(r, inputs) if deepstack else []
        if deepstack:
            assert len(ds_feats) == 1  # tiny Qwen3-VL: one deepstack level, added after layer 0
            assert r.adapter.deepstack_layers(r.model) == (0,)
        voff = 0
        for row, i in enumerate(batch):
            p = r.ex.planned[i]
            span = slice(p.visual_start, p.visual_start + p.visual_length)
            cached_vis = r.vis[vci, r.voff[i] : r.voff[i] + r.vlen[i]]  # (vtoken, layer, hidden)
            for layer in range(N_LAYERS + 1):
                ref = (hs[layer] if layer < N_LAYERS else last)[row].numpy()
                for site, pos in ((I_INSTR, p.instruction), (I_PRED, p.prediction)):
                    assert np.array_equal(r.text[ci, i, site, layer], ref[pos]), (label, i, site, layer)
                want = ref[span]
                if 1 <= layer <= len(ds_feats):  # the stream entering layer l includes the deepstack add
                    add = ds_feats[layer - 1][voff : voff + p.visual_length].numpy()
                    assert not np.array_equal(cached_vis[:, layer], want), "deepstack add missing"
                    want = (hs[layer][row, span] + ds_feats[layer - 1][voff : voff + p.visual_length]).numpy()
                    assert np.abs(add).max() > 0
                assert np.array_equal(cached_vis[:, layer], want), (label, i, layer)
            voff += p.visual_length
        assert not deepstack or voff == ds_feats[0].shape[0]


def test_lens_norm_reproduces_the_final_norm(run):
    """The adapter's lens_norm, applied as the CPU lens does, is the model's final norm; the store holds it."""
    from gapcache.analyze.lens import rmsnorm

    r = run
    ln = r.adapter.lens_norm(r.model)
    h = torch.randn(5, r.adapter.hidden_size(r.model), generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        want = r.adapter.final_norm(r.model)(h).double().numpy()
    got = rmsnorm(h.double().numpy(), ln["weight"].astype(np.float64), ln["eps"], ln["offset"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    attrs = r.ds.lens_norm_weight.attrs
    assert {k: attrs[k] for k in ("norm_class", "eps", "offset", "formula")} == {
        k: ln[k] for k in ("norm_class", "eps", "offset", "formula")}
    assert ln["weight"].dtype == np.float32 and np.array_equal(r.ds.lens_norm_weight.values, ln["weight"])


def test_lens_norm_of_a_one_plus_w_family():
    """A Gemma-style final norm, ``(1 + w) * h / rms``: an adapter with norm_offset 1 records it so
    that the CPU lens reproduces the module (and offset 0 would not)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from gapcache.analyze.lens import rmsnorm
    from gapcache.extract.families import Adapter

    class GemmaLike(Adapter):
        family, norm_offset = "gemma_like", 1.0

    norm = GemmaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
    model = SimpleNamespace(model=SimpleNamespace(language_model=SimpleNamespace(norm=norm)))
    ln = GemmaLike().lens_norm(model)
    assert (ln["offset"], ln["eps"], ln["norm_class"]) == (1.0, 1e-6, "GemmaRMSNorm")
    assert "(1 + w) * h" in ln["formula"]
    h = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = norm(h).double().numpy()
    np.testing.assert_allclose(rmsnorm(h.double().numpy(), ln["weight"], ln["eps"], ln["offset"]), want,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(rmsnorm(h.double().numpy(), ln["weight"], ln["eps"]), want, atol=1e-3)


# --------------------------------------------------------------------------- 3. answer scores


def test_gold_and_candidate_logprobs(run):
    r = run
    ci = r.ci("original")
    gold = r.ds.gold_logprob.values[ci]
    cand = r.ds.candidate_logprob.values[ci]
    cands = [str(c) for c in r.ds.candidate.values]
    mask = r.ds.candidate_mask.values
    single = 0
    for i, (p, s) in enumerate(zip(r.ex.planned, r.samples)):
        logp, n, hs = plain_logprobs(r, i)
        ans = answer_ids(r, s.answer)
        mine = sum(float(logp[n - 1 + t, tok]) for t, tok in enumerate(ans))
        np.testing.assert_allclose(gold[i], mine, rtol=1e-5, atol=1e-5)
        assert gold[i] < 0
        # the padded, batched run matches an unbatched forward up to float noise (positions, masks, rope)
        for layer in range(N_LAYERS):
            for site, pos in ((I_INSTR, p.instruction), (I_PRED, p.prediction)):
                np.testing.assert_allclose(r.text[ci, i, site, layer], hs[layer][0, pos].numpy(), rtol=1e-4, atol=1e-5)

        # every candidate: log p(shared prefix) + log p(first distinguishing token), at the prediction site
        seqs = {c: answer_ids(r, c) for c in s.candidates}
        k = 0
        while all(len(q) > k for q in seqs.values()) and len({q[k] for q in seqs.values()}) == 1:
            k += 1
        assert int(r.ds.candidate_prefix_tokens[i]) == k and ans[:k] == seqs[s.answer][:k]
        prefix = sum(float(logp[n - 1 + t, ans[t]]) for t in range(k))
        for c in cands:
            j = cands.index(c)
            assert mask[i, j] == (c in s.candidates)
            if c not in s.candidates:
                assert np.isnan(cand[i, j])
                continue
            if len(seqs[c]) == k + 1:  # shared prefix + one token: the exact score is the old rule's
                np.testing.assert_allclose(cand[i, j], prefix + float(logp[n - 1 + k, seqs[c][k]]), rtol=1e-5,
                                           atol=1e-5)
            # every candidate, however many tokens: the teacher-forced log-prob of its full continuation
            lp_c = logp if c == s.answer else plain_logprobs(r, i, answer=c)[0]
            exact = sum(float(lp_c[n - 1 + t, tok]) for t, tok in enumerate(seqs[c]))
            np.testing.assert_allclose(cand[i, j], exact, rtol=1e-5, atol=1e-5)
        if len(ans) == k + 1:  # gold = shared prefix + one token: its candidate score is the gold log-prob
            single += 1
            if k == 0:  # the same float32 log-prob read twice: exact
                assert cand[i, cands.index(s.answer)] == gold[i]
            else:  # prefix summed in float64 for gold, added in float32 for the candidate: a few ulp apart
                assert abs(cand[i, cands.index(s.answer)] - gold[i]) <= 4 * np.spacing(abs(gold[i]))
    assert single >= 4  # yes/no and digit answers


# --------------------------------------------------------------------------- 4. truncated


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("L", TRUNC_LAYERS)
def test_truncated_text_states(run, strategy, L):
    r = run
    label = f"truncated_{strategy}_L{'m1' if L < 0 else L}"
    assert r.ds.attrs["conditions"][r.ci(label)] == {
        "label": label, "kind": "truncated", "truncation_layer": L, "strategy": strategy}
    orig, trunc = r.text[r.ci("original")], r.text[r.ci(label)]
    # layers 0..L read real visual states, so every stream up to the input of layer L+1 is untouched at
    # the text sites (L+1 itself: only visual positions are intervened on, or masked inside the layer)
    same = min(L + 1, N_LAYERS)
    assert np.array_equal(trunc[:, :, : same + 1], orig[:, :, : same + 1])
    gold_o, gold_t = r.ds.gold_logprob.values[r.ci("original")], r.ds.gold_logprob.values[r.ci(label)]
    cand_o, cand_t = (r.ds.candidate_logprob.values[r.ci(x)] for x in ("original", label))
    if L == N_LAYERS - 1:
        assert np.array_equal(trunc, orig)
        assert np.array_equal(gold_t, gold_o)
        assert np.array_equal(cand_t, cand_o, equal_nan=True)
        return
    for layer in range(same + 1, N_LAYERS + 1):  # every later layer, every sample, both sites
        for i in range(N_SAMPLES):
            for site in range(len(SITES)):
                assert not np.array_equal(trunc[i, site, layer], orig[i, site, layer]), (label, i, site, layer)
    assert not np.array_equal(gold_t, gold_o)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generation_under_truncation_is_the_truncated_models_greedy_continuation(run, strategy):
    """Greedy generation (left padded, KV cache) under truncated after layer 0 equals, token by token, the
    argmax of teacher-forced forwards under the same hooks, on every family (ragged Qwen spans included)."""
    assert_greedy_under_truncation(run.ex, run.cond[f"truncated_{strategy}_L0"], ([0, 1, 2], [3]))


@pytest.mark.parametrize("L", TRUNC_LAYERS)
def test_truncated_zero_hooks_see_zeros(run, L):
    """Own pre-hooks (run after gapcache's): inputs of layers <= L real, of layers > L zero at visual positions."""
    r = run
    layers = r.adapter.decoder_layers(r.model)
    batch = run_batches(r)[0]
    P = [r.ex.planned[i] for i in batch]

    def visual_inputs(cond):
        seen = {}

        def hook(j):
            def fn(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                if h.shape[0] != len(P):  # an extra candidate forward (runs before the batch's main one)
                    return
                seen[j] = [h[row, p.visual_start : p.visual_start + p.visual_length].clone() for row, p in enumerate(P)]
            return fn

        handles = [m.register_forward_pre_hook(hook(j), with_kwargs=True) for j, m in enumerate(layers)]
        try:
            r.ex.forward(batch, cond)
        finally:
            for h in handles:
                h.remove()
        return seen

    real = visual_inputs(r.cond["original"])
    seen = visual_inputs(r.cond[f"truncated_zero_L{'m1' if L < 0 else L}"])
    for j in range(N_LAYERS):
        for row in range(len(P)):
            if j <= L:
                assert torch.equal(seen[j][row], real[j][row])
            else:
                assert real[j][row].abs().max() > 0
                assert torch.equal(seen[j][row], torch.zeros_like(seen[j][row]))



@pytest.mark.parametrize("single", (False, True), ids=("batch", "single"))
@pytest.mark.parametrize("L", (-1, 1))
def test_truncated_drop_masks_visual_keys(run, L, single):
    """Own pre-hooks: layers <= L get the model's mask; layers > L the same mask minus (text query, visual key).

    ``single``: one unpadded row, where SDPA models may pass no mask at all (is_causal).
    """
    r = run
    layers = r.adapter.decoder_layers(r.model)
    batch = [1] if single else run_batches(r)[0]
    P = [r.ex.planned[i] for i in batch]
    inputs = r.ex.batch_inputs(batch, r.cond["original"])
    b, seq = inputs["input_ids"].shape
    vis = torch.zeros(b, seq, dtype=torch.bool)
    for row, p in enumerate(P):
        vis[row, p.visual_start : p.visual_start + p.visual_length] = True

    def masks(cond):
        seen = {}

        def hook(j):
            def fn(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                seen[j] = allowed_keys(kwargs.get("attention_mask"), h.shape[1], inputs["attention_mask"])
            return fn

        handles = [m.register_forward_pre_hook(hook(j), with_kwargs=True) for j, m in enumerate(layers)]
        try:
            res = r.ex.forward(batch, cond)
        finally:
            for h in handles:
                h.remove()
        return seen, res

    label = f"truncated_drop_L{'m1' if L < 0 else L}"
    real, _ = masks(r.cond["original"])
    seen, res = masks(r.cond[label])
    # the rows agree with the store's (batched, padded) run of the same condition, up to float noise
    for row, i in enumerate(batch):
        np.testing.assert_allclose(res[row]["text_states"], r.text[r.ci(label), i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res[row]["gold_logprob"], r.ds.gold_logprob.values[r.ci(label), i], rtol=1e-5, atol=1e-5)
    hide = (~vis)[:, :, None] & vis[:, None, :]  # (batch, query, key)
    for j in range(N_LAYERS):
        expected = real[j].expand(b, seq, seq) if j <= L else real[j].expand(b, seq, seq) & ~hide
        assert torch.equal(seen[j].expand(b, seq, seq), expected), j
        if j > L:  # visual queries still see the visual keys before them; text queries see none
            row, p = 0, P[0]
            last_text = p.prediction
            assert not seen[j][row, last_text, p.visual_start : p.visual_start + p.visual_length].any()
            assert seen[j][row, p.visual_start + 1, p.visual_start : p.visual_start + 2].all()


# --------------------------------------------------------------------------- 5. blind images


def test_blind_images_are_what_design_says(run):
    r = run
    attrs = r.ds.attrs["condition_params"]
    originals = [s.load_image() for s in r.samples]

    # black: all zeros, original size
    for i, im in enumerate(originals):
        black = r.ex.condition_image(i, r.cond["blind_black"])
        assert black.size == im.size and black.mode == "RGB"
        assert not np.asarray(black).any()

    # mean: uniform, the recorded pixel-weighted mean RGB of the run's images, rounded half up
    pixels = np.concatenate([np.asarray(im, dtype=np.float64).reshape(-1, 3) for im in originals])
    recorded = attrs["blind_mean"]["mean_rgb"]
    np.testing.assert_allclose(recorded, pixels.mean(0), rtol=0, atol=1e-9)
    colour = np.floor(np.asarray(recorded) + 0.5).astype(np.uint8)
    for i, im in enumerate(originals):
        mean = np.asarray(r.ex.condition_image(i, r.cond["blind_mean"]))
        assert mean.shape == (im.size[1], im.size[0], 3)
        assert (mean == colour).all()

    # randomimage: a recorded derangement; the donor's image resized (bicubic) to the original's size
    donor = np.asarray(attrs["blind_randomimage"]["donor"])
    assert attrs["blind_randomimage"]["seed"] == r.ex.cfg.extract.seed == 3
    assert np.array_equal(donor, r.ds.donor.values)
    assert sorted(donor.tolist()) == list(range(N_SAMPLES)) and not (donor == np.arange(N_SAMPLES)).any()
    resized = 0
    for i, im in enumerate(originals):
        rnd = r.ex.condition_image(i, r.cond["blind_randomimage"])
        src = originals[donor[i]]
        assert rnd.size == im.size
        want = src if src.size == im.size else src.resize(im.size, Image.Resampling.BICUBIC)
        resized += src.size != im.size
        assert np.array_equal(np.asarray(rnd), np.asarray(want))
        assert not np.array_equal(np.asarray(rnd), np.asarray(im))  # never its own image
    assert resized > 0  # the mixed sizes exercise the resize


def test_blind_conditions_keep_the_token_layout(run):
    r = run
    for label in VISUAL_CONDITIONS:
        cond = r.cond[label]
        for i, p in enumerate(r.ex.planned):
            batch = r.processor(text=[p.prompt], images=[r.ex.condition_image(i, cond)], return_tensors="pt")
            assert batch["input_ids"][0].tolist() == p.prompt_ids, (label, i)
            assert n_visual_features(r.model, batch) == r.vlen[i]
        span = r.vis[r.vci(label)]
        for i in range(N_SAMPLES):  # every row of the span written, under every visual condition
            rows = span[r.voff[i] : r.voff[i] + r.vlen[i]]
            assert np.isfinite(rows).all() and (np.abs(rows).reshape(r.vlen[i], -1).max(1) > 0).all()
    # same token layout -> text sites' embedding output identical across every condition
    layer0 = r.text[:, :, :, 0]
    assert all(np.array_equal(layer0[c], layer0[0]) for c in range(layer0.shape[0]))
    # and the image did change what the model sees
    written = r.ds.vtoken_sample.values >= 0
    for label in VISUAL_CONDITIONS[1:]:
        assert not np.array_equal(r.vis[r.vci(label), written, 0], r.vis[r.vci("original"), written, 0])
