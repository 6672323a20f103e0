"""Generation through the public API (cached, uncached and full re-runs agree; either cache name; generated
`<image>` ids are text; beam search and sampling; batched with left padding; compiled static-cache decoding), and
save/load through every Auto class, the processor and the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CompileConfig,
    pipeline,
)

from asymoe import AsyMoEForConditionalGeneration
from asymoe.compat import CACHE_NAME
from asymoe.tiny import tiny_config

from conftest import PROMPT_A, PROMPT_B, make_image, new_tokens, seed_everything, wake

# --------------------------------------------------------------------------------------------------------------------
# Generation.


@pytest.fixture(scope="module")
def lively(tokenizer):
    seed_everything(0)
    model = AsyMoEForConditionalGeneration(tiny_config(tokenizer, "asymoe", evidence_layers=[1, 3])).eval()
    return wake(model)


def reference_greedy(model, prompt: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the full sequence each step (no cache); generated tokens are text."""
    ids, types = prompt["input_ids"], (prompt["input_ids"] == model.config.image_token_id).long()
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids, pixel_values=prompt["pixel_values"], mm_token_type_ids=types, use_cache=False
            ).logits
        next_id = logits[:, -1].argmax(-1, keepdim=True)
        ids, types = torch.cat([ids, next_id], dim=1), torch.cat([types, torch.zeros_like(next_id)], dim=1)
    return ids


def test_cached_generation_equals_uncached_and_full_reruns(lively, make_inputs):
    prompt = make_inputs(PROMPT_B, image_seed=1)
    cached = lively.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = lively.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    generated = new_tokens(cached, prompt)
    assert generated.shape[1] >= 4 and len(set(generated[0].tolist())) > 1  # a real, varied continuation
    assert torch.equal(cached, reference_greedy(lively, prompt, generated.shape[1]))
    # Token types from the processor give the same result as types inferred from the `<image>` ids.
    typed = make_inputs(PROMPT_B, image_seed=1, return_mm_token_type_ids=True)
    assert "mm_token_type_ids" in typed
    assert torch.equal(lively.generate(**typed, max_new_tokens=8, do_sample=False), cached)


def test_cache_under_either_name_and_tuple_outputs(lively, make_inputs):
    """transformers 5.24 passes the KV cache as `cache=`, earlier releases as `past_key_values=`: both continue the
    same cache; `return_dict=False` gives the output's tuple, as transformers' models do."""
    prompt = make_inputs(PROMPT_B, image_seed=1)
    with torch.no_grad():
        prefill = lively(**prompt, use_cache=True)
        cache = prefill[CACHE_NAME]
        assert cache.get_seq_length() == prompt["input_ids"].shape[1]
        step = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(step)], 1)
        new = lively(input_ids=step, attention_mask=mask, cache=copy.deepcopy(cache)).logits
        old = lively(input_ids=step, attention_mask=mask, past_key_values=copy.deepcopy(cache)).logits
        full = lively(
            input_ids=torch.cat([prompt["input_ids"], step], 1), attention_mask=mask,
            pixel_values=prompt["pixel_values"], use_cache=False,
        ).logits
        torch.testing.assert_close(new, old, atol=0, rtol=0)
        torch.testing.assert_close(new[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="Two different KV caches"):
            lively(input_ids=step, attention_mask=mask, cache=cache, past_key_values=copy.deepcopy(cache))

        as_tuple = lively(**prompt, labels=prompt["input_ids"], return_dict=False)
        as_dict = lively(**prompt, labels=prompt["input_ids"])
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict)
        torch.testing.assert_close(as_tuple[0], as_dict.loss)
        torch.testing.assert_close(as_tuple[1], as_dict.logits)
        base = lively.model(**prompt, return_dict=False)
        assert isinstance(base, tuple)
        torch.testing.assert_close(base[0], lively.model(**prompt).last_hidden_state)


def test_generated_image_tokens_are_text(lively, make_inputs):
    """A generated `<image>` id carries no image features: it is routed, and never read as evidence, as text —
    identically with the cache (decode steps), without it, and in a full re-run that marks it as text."""
    image_id = lively.config.image_token_id
    prompt = make_inputs(PROMPT_A)
    bias = {(image_id,): 1.0}  # make the model emit `<image>` often, among other tokens
    kwargs = dict(max_new_tokens=8, do_sample=False, sequence_bias=bias)
    cached = lively.generate(**prompt, use_cache=True, **kwargs)
    uncached = lively.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    generated = new_tokens(cached, prompt)[0].tolist()
    assert image_id in generated and set(generated) != {image_id}

    # The reference: full re-runs with the bias added to the logits, generated tokens typed as text.
    ids, types = prompt["input_ids"], (prompt["input_ids"] == image_id).long()
    for _ in generated:
        with torch.no_grad():
            logits = lively(input_ids=ids, pixel_values=prompt["pixel_values"], mm_token_type_ids=types).logits[:, -1]
        logits[:, image_id] += 1.0
        next_id = logits.argmax(-1, keepdim=True)
        ids, types = torch.cat([ids, next_id], 1), torch.cat([types, torch.zeros_like(next_id)], 1)
    assert torch.equal(cached, ids)

    # A manual decode step continuing the cache without images: `<image>` ids are text without being told so.
    with torch.no_grad():
        cache = lively(**prompt, use_cache=True)[CACHE_NAME]
        step = torch.tensor([[image_id]])
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(step)], 1)
        implicit = lively(input_ids=step, attention_mask=mask, cache=copy.deepcopy(cache)).logits
        explicit = lively(
            input_ids=step, attention_mask=mask, past_key_values=copy.deepcopy(cache),
            mm_token_type_ids=torch.zeros_like(step),
        ).logits
        as_image = lively(
            input_ids=step, attention_mask=mask, past_key_values=copy.deepcopy(cache),
            mm_token_type_ids=torch.ones_like(step),
        ).logits
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)
    assert (as_image - explicit).abs().max() > 1e-3  # routing an image token differently does change the output


def test_beam_search_and_sampling(lively, make_inputs):
    prompt = make_inputs([PROMPT_A, PROMPT_B])
    beams = lively.generate(**prompt, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4 and beams.shape[1] > prompt["input_ids"].shape[1]
    beams_uncached = lively.generate(
        **prompt, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, use_cache=False
    )
    assert torch.equal(beams, beams_uncached)

    torch.manual_seed(123)
    sampled = lively.generate(**prompt, max_new_tokens=4, do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(123)
    again = lively.generate(**prompt, max_new_tokens=4, do_sample=True, top_k=0, temperature=1.5)
    assert sampled.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(sampled, again)


def test_batched_generation_matches_single(lively, make_inputs, tokenizer):
    batch = make_inputs([PROMPT_A, PROMPT_B], image_seed=0)
    batched = new_tokens(lively.generate(**batch, max_new_tokens=6, do_sample=False), batch)
    for row, (text, seed) in enumerate([(PROMPT_A, 0), (PROMPT_B, 1)]):
        alone = make_inputs(text, image_seed=seed)
        single = new_tokens(lively.generate(**alone, max_new_tokens=6, do_sample=False), alone)[0]
        # A sample that stops early (eos) is padded in the batch.
        expected = torch.full((batched.shape[1],), tokenizer.pad_token_id)
        expected[: single.shape[0]] = single
        assert torch.equal(batched[row], expected), (row, batched[row].tolist(), single.tolist())


def test_static_cache_generation_compiles_to_one_graph(lively, make_inputs):
    """`generate(cache_implementation="static")` gives the dynamic cache's tokens, and its decoding steps compile with
    `fullgraph=True` (no graph break, no host sync; transformers compiles them by itself on GPUs), also when the
    cache is reused by a second call. `aot_eager` traces like inductor without generating code."""
    batch = make_inputs([PROMPT_A, PROMPT_B], image_seed=0)  # left-padded, evidence experts in layers 1 and 3
    kwargs = dict(max_new_tokens=6, do_sample=False)
    dynamic = lively.generate(**batch, **kwargs)
    assert torch.equal(lively.generate(**batch, cache_implementation="static", **kwargs), dynamic)

    compiled = copy.deepcopy(lively)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only otherwise
    compiled.generation_config.compile_config = compile_config
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of graphs compiled earlier in this process
    other = make_inputs([PROMPT_B, PROMPT_A], image_seed=3)
    compiled.generate(**other, cache_implementation="static", **kwargs)  # fills the cache the next call reuses
    assert torch.equal(compiled.generate(**batch, cache_implementation="static", **kwargs), dynamic)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, f"{graphs} graphs: decoding steps recompile"  # 5.17's int cache length adds one


# --------------------------------------------------------------------------------------------------------------------
# Save / load.


@pytest.fixture(scope="module")
def saved(tmp_path_factory, lively, processor):
    directory = tmp_path_factory.mktemp("asymoe-checkpoint")
    lively.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("auto_class", [AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel])
def test_auto_class_round_trip_gives_identical_logits(auto_class, saved, lively, make_inputs):
    loaded = auto_class.from_pretrained(saved, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "AsyMoEForConditionalGeneration"
    inputs = make_inputs([PROMPT_A, PROMPT_B])
    with torch.no_grad():
        expected = lively(**inputs, output_router_logits=True)
        got = loaded(**inputs, output_router_logits=True)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.aux_loss, expected.aux_loss)


def test_half_precision_load_keeps_routers_fp32(saved):
    loaded = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True, dtype=torch.bfloat16)
    routers = {n: p.dtype for n, p in loaded.named_parameters() if ".router." in n}
    assert routers and set(routers.values()) == {torch.float32}
    assert loaded.lm_head.weight.dtype == torch.bfloat16


def test_processor_round_trip(saved, processor):
    loaded = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    assert loaded.num_image_tokens == processor.num_image_tokens
    texts, images = [PROMPT_A, PROMPT_B], [make_image(0), make_image(1)]
    expected = processor(images=images, text=texts, padding=True, return_tensors="pt")
    got = loaded(images=images, text=texts, padding=True, return_tensors="pt")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == processor.apply_chat_template(
        messages, add_generation_prompt=True
    )


def test_pipeline_answers(saved, lively, processor):
    """The image-text-to-text pipeline loads the checkpoint and answers a chat with an image as `generate` does."""
    pipe = pipeline("image-text-to-text", model=str(saved), trust_remote_code=True)
    image = make_image(3)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "what color is it ?"}]
    messages = [{"role": "user", "content": content}]
    out = pipe(text=messages, max_new_tokens=4, do_sample=False, return_full_text=False)
    answer = out[0]["generated_text"]
    assert isinstance(answer, str) and answer.strip()

    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    ids = new_tokens(lively.generate(**inputs, max_new_tokens=4, do_sample=False), inputs)[0]
    assert answer.strip() == processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    chat = pipe(text=messages, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"].strip() == answer.strip()
