"""The model's own fused forward, one pair at a time: what the engine's split path (features fed
back, shared prefix, micro-batches) must equal. A test tool, kept out of `RerankEngine`."""

import torch

from engine.engine import RerankEngine
from engine.inputs import ScoreRequest
from engine.prepare import VIDEO


@torch.inference_mode()
def reference_scores(engine: RerankEngine, request: ScoreRequest) -> list[float]:
    """Each pair through the model's own fused forward from pixel values, one at a time,
    left-padding free, no precomputed features, no shared prefix."""
    prepared = engine.preparer.prepare(request)
    out = []
    for row in prepared.rows:
        batch = {
            "input_ids": row.ids[None].to(engine.device),
            "attention_mask": torch.ones((1, len(row)), dtype=torch.long, device=engine.device),
            "mm_token_type_ids": engine.preparer.mm_types(row.ids)[None].to(engine.device),
        }
        images = [prepared.patches[k] for k, kind in zip(row.visuals, row.kinds) if kind != VIDEO]
        videos = [prepared.patches[k] for k, kind in zip(row.visuals, row.kinds) if kind == VIDEO]
        dtype = engine.forwarder.vision_dtype
        if images:
            batch["pixel_values"] = torch.cat([p.pixel_values for p in images]).to(engine.device, dtype)
            batch["image_grid_thw"] = torch.tensor([p.grid_thw for p in images], device=engine.device)
        if videos:
            batch["pixel_values_videos"] = torch.cat([p.pixel_values for p in videos]).to(engine.device, dtype)
            batch["video_grid_thw"] = torch.tensor([p.grid_thw for p in videos], device=engine.device)
        logits = engine.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        out.append(float(torch.sigmoid(logits[0, engine.yes_id] - logits[0, engine.no_id])))
    return out
