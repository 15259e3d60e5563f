"""lm-evaluation-harness on qfx artifacts: the model type `qfx`.

    python -m qfx.lm_harness run --model qfx --model_args artifact=DIR[,backend=torch|onnx] --tasks ...

Importing this module registers `qfx` in lm-eval's model registry (lm-eval's way for models
defined outside it); `python -m qfx.lm_harness` is lm-eval's own command line with it registered,
and `lm_eval.simple_evaluate(model="qfx", ...)` works after `import qfx.lm_harness`. The package
also names it under the `lm_eval.models` entry point, for lm-eval versions that discover plugins.

model_args: artifact (the folder), backend (torch: qfx.runtime.load; onnx: model.onnx in ONNX
Runtime), max_length (tokens per forward pass, default 256), max_gen_toks (default 128),
trust_factory, and lm-eval's batch_size / device.

Scoring is lm-eval's: loglikelihood scores each continuation after its context (left-truncated
to max_length), loglikelihood_rolling scores every token of a document after a prefix token in
the disjoint windows of qfx.runtime.evaluate.rolling_windows, which `qfx eval` uses too, so the
two give the same perplexity on the same text and window. Requests are run in batches of
`batch_size` windows, right-padded (a causal model's logits do not see later positions).
generate_until decodes greedily: in batches with the torch backend (left-padded, with an attention
mask and the KV cache), one request at a time with ONNX (the exported model takes no mask and no
cache, so each step runs the whole sequence).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from qfx.errors import UserError
from qfx.evaluation import artifact_tokenizer
from qfx.runtime import load
from qfx.runtime.artifact_files import read_manifest
from qfx.runtime.evaluate import rolling_windows

BACKENDS = ("torch", "onnx")


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("qfx")
class QfxLM(TemplateLM):
    def __init__(self, artifact: str, backend: str = "torch", max_length: int = 256, max_gen_toks: int = 128,
                 batch_size: int | str = 8, device: str | None = None, trust_factory: bool | str = False,
                 **unused):
        super().__init__()
        folder = Path(artifact)
        manifest = read_manifest(folder)
        if manifest["model"]["kind"] != "causal_lm":
            raise UserError(f"{folder} is a {manifest['model']['kind']} artifact; lm-eval's model qfx scores causal LMs")
        if backend not in BACKENDS:
            raise UserError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        self.backend_name = backend
        self.model = load(folder, trust_factory=_flag(trust_factory))  # checks the artifact's hashes first
        self.tokenizer = artifact_tokenizer(folder, manifest)
        # lm-eval's command line asks for cuda by default, also where there is none: CPU then
        wanted = torch.device(device) if device and backend == "torch" else torch.device("cpu")
        self.torch_device = wanted if wanted.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")
        if backend == "torch":
            self.model.to(self.torch_device)
        else:
            from qfx.runtime.ort import require_onnx, session

            require_onnx("backend=onnx")
            if not (folder / "model.onnx").is_file():
                raise UserError(f"{folder} has no model.onnx", hint="build with output.formats: [safetensors, onnx]")
            self.session = session(folder / "model.onnx")
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        # lm-eval's "auto" (or "auto:N") searches the largest batch that fits a GPU: 8 here
        self.batch_size = 8 if str(batch_size).startswith("auto") else max(1, int(batch_size))

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """BOS where the tokenizer has one (what it puts before a text, as `qfx eval` reads it)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- scoring --------------------------------------------------------------------------------
    def logits(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, length, vocab] float32 logits of right-padded ids."""
        if self.backend_name == "onnx":
            return torch.from_numpy(self.session.run(None, {"input_ids": ids.numpy()})[0]).float()
        with torch.no_grad():
            return self.model(input_ids=ids.to(self.torch_device), attention_mask=None if mask is None else
                              mask.to(self.torch_device), use_cache=False).logits.float().cpu()

    def score(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, all greedy) of each item's targets, which its input's last
        logits predict; in batches of similar length."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(items[batch[0]][0])
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(items[i][0])] = torch.tensor(items[i][0])
            logits = self.logits(ids)
            for row, i in enumerate(batch):
                inputs, targets = items[i]
                scored = F.log_softmax(logits[row, len(inputs) - len(targets):len(inputs)].double(), dim=-1)
                target = torch.tensor(targets)
                results[i] = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]  # left-truncated to max_length inputs
            scored = min(len(continuation), len(whole) - 1)
            items.append((whole[:-1], whole[len(whole) - scored:]))
        return self.score(items)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        items, owners = [], []
        for n, request in enumerate(requests):
            stream = [self.prefix_token_id] + self.tok_encode(request.args[0])
            for start, end, scored in rolling_windows(len(stream), self.max_length):
                items.append((stream[start:end], stream[end - scored + 1:end + 1]))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(items)):
            totals[owner] += logprob
        return totals

    # -- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the first stop string; requests that share their stop strings
        and length run in one batch (torch backend)."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            kwargs = request.args[1] if len(request.args) > 1 else {}
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = (until,) if isinstance(until, str) else tuple(until)
            groups.setdefault((until, int(kwargs.get("max_gen_toks", self.max_gen_toks))), []).append(i)
        outputs: list[str | None] = [None] * len(requests)
        size = self.batch_size if self.backend_name == "torch" else 1
        for (until, steps), members in groups.items():
            for start in range(0, len(members), size):
                batch = members[start:start + size]
                prompts = [self.tok_encode(requests[i].args[0], add_special_tokens=True)
                           [-max(1, self.max_length - steps):] for i in batch]
                for i, text in zip(batch, self._greedy(prompts, steps)):
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    outputs[i] = text
        return outputs

    def _greedy(self, prompts: list[list[int]], steps: int) -> list[str]:
        """Greedy continuations of left-padded prompts (at most `steps` tokens, ending at EOS)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        if self.backend_name == "torch":
            with torch.no_grad():
                out = self.model.generate(input_ids=ids.to(self.torch_device), attention_mask=mask.to(self.torch_device),
                                          max_new_tokens=steps, do_sample=False, pad_token_id=self.eot_token_id)
            new = out[:, width:].cpu()
        else:  # one prompt, no padding: the exported model takes no mask
            new = ids[:, :0]
            for _ in range(steps):
                token = self.logits(torch.cat([ids, new], 1)[:, -self.max_length:])[:, -1].argmax(-1, keepdim=True)
                new = torch.cat([new, token], 1)
                if int(token) == self.eot_token_id:
                    break
        return [self.tok_decode([t for t in row.tolist() if t != self.eot_token_id]) for row in new]


def main() -> None:
    """lm-eval's command line, with the model type `qfx` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
