"""The identity of a loaded model, as a reference store records and checks it."""

from __future__ import annotations

from lm_eval_c3po.store.signature import ModelSignature, config_fingerprint, tokenizer_fingerprint


def model_signature(model, tokenizer, routing, model_id: str, revision: str | None) -> ModelSignature:
    """What a store must agree with to be used for ``model``: fingerprints and MoE shape.

    ``routing`` is the model's :class:`~lm_eval_c3po.routing.RoutingController` (read for its MoE shape only).
    """
    return ModelSignature(
        model_id=str(model_id),
        revision=str(revision or "main"),
        config_fingerprint=config_fingerprint(model.config),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        num_layers=routing.num_layers,
        num_experts=routing.num_experts,
        top_k=routing.top_k,
        routing_kind=routing.routing_kind,
        moe_layers=tuple(layer.decoder_layer if layer.decoder_layer is not None else layer.index
                         for layer in routing.layers),
    )


def lm_signature(lm) -> ModelSignature:
    """:func:`model_signature` of an lm-eval HFLM-like model with a ``routing`` controller."""
    pretrained = lm.pretrained if isinstance(lm.pretrained, str) else lm.model.name_or_path
    return model_signature(lm.model, lm.tokenizer, lm.routing, pretrained, getattr(lm, "revision", None))
