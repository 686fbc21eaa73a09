"""lmms-eval model class for moetool checkpoints (dense and sparse): batched greedy generation
with the KV cache, the checkpoint's chat template and its image preprocessing."""

from __future__ import annotations

from lmms_eval import utils
from lmms_eval.api.model import lmms

from moetool.models.inference import (  # noqa: F401  (re-exported for lmms-eval users)
    answer,
    build_prompt,
    load_checkpoint,
    prepare_image,
    training_aspect_ratio,
)


class MoeTool(lmms):
    is_simple = True

    def __init__(
        self, pretrained: str, device: str = "cpu", batch_size=1, dtype="float32", **kwargs
    ):
        super().__init__()
        self.model, self.processor = load_checkpoint(pretrained, dtype, device)
        self.device_name = device
        self.batch_size = int(batch_size)
        self.aspect_ratio = training_aspect_ratio(self.model.config)

    def clean(self):
        """Keep the model across evaluations (lmms-eval's default deletes every module)."""

    def generate_until(self, requests) -> list[str]:
        collator = utils.Collator(
            [r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True
        )
        answers: list[str] = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, gen_kwargs, to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
            kwargs = dict(gen_kwargs[0])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            images = [
                [v for v in visual(self.task_dict[task][split][doc_id]) if v is not None]
                for visual, doc_id, task, split in zip(
                    to_visual, doc_ids, tasks, splits, strict=True
                )
            ]
            texts = answer(
                self.model,
                self.processor,
                contexts,
                images,
                max_new_tokens=int(kwargs.get("max_new_tokens", 128)),
                num_beams=int(kwargs.get("num_beams") or 1),  # greedy, whatever the temperature
                device=self.device_name,
            )
            for text in texts:
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                answers.append(text.strip())
        return collator.get_original(answers)

    def loglikelihood(self, requests):
        raise NotImplementedError("moetool evaluates generation tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("moetool evaluates single-round tasks only")
