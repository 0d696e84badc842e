"""An independent float64 numpy sparse cross-encoder: one sequence per document, an explicit 3-D mask built
from the rules in the design note, Hugging Face weight names. Shares no code with sce_jax."""

from __future__ import annotations

import numpy as np
from scipy.special import erf

CLS, QUERY, DOC = 0, 1, 2


def attention_mask(num_query: int, num_doc: int, pattern: dict, window: int | None) -> np.ndarray:
    """mask[i, j]: may token i see token j, for the sequence [CLS] + query + document."""
    groups = np.array([CLS] + [QUERY] * num_query + [DOC] * num_doc)
    length = len(groups)
    mask = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(length):
            gi, gj = groups[i], groups[j]
            if gi == CLS:
                mask[i, j] = gj == CLS or (gj == QUERY and pattern["cls_query_attention"]) or (
                    gj == DOC and pattern["cls_doc_attention"]
                )
            elif gi == QUERY:
                mask[i, j] = gj == QUERY or (gj == CLS and pattern["query_cls_attention"]) or (
                    gj == DOC and pattern["query_doc_attention"]
                )
            else:
                near = window is None or abs(i - j) <= window
                mask[i, j] = (gj == DOC and near) or (gj == CLS and pattern["doc_cls_attention"]) or (
                    gj == QUERY and pattern["doc_query_attention"]
                )
    return mask


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def forward(state: dict, hf_config: dict, query_ids, doc_ids, pattern: dict, window: int | None):
    """(logit, hidden states per layer [L+1, T, H]) for the sequence [CLS] + query_ids + doc_ids."""
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    eps = hf_config.get("layer_norm_eps", 1e-12)
    heads = hf_config["num_attention_heads"]
    ids = np.array([hf_config.get("cls_token_id", 101), *query_ids, *doc_ids])
    types = np.array([0] * (1 + len(query_ids)) + [1] * len(doc_ids))
    x = (
        s["bert.embeddings.word_embeddings.weight"][ids]
        + s["bert.embeddings.position_embeddings.weight"][np.arange(len(ids))]
        + s["bert.embeddings.token_type_embeddings.weight"][types]
    )
    x = _layer_norm(x, s["bert.embeddings.LayerNorm.weight"], s["bert.embeddings.LayerNorm.bias"], eps)
    mask = attention_mask(len(query_ids), len(doc_ids), pattern, window)
    hidden = [x]

    def dense(h, name):
        return h @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    for i in range(hf_config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}"
        t, f = x.shape
        q, k, v = (dense(x, f"{p}.attention.self.{n}").reshape(t, heads, -1) for n in ("query", "key", "value"))
        scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(mask[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("hij,jhd->ihd", probs, v).reshape(t, f)
        x = _layer_norm(x + dense(context, f"{p}.attention.output.dense"), s[f"{p}.attention.output.LayerNorm.weight"], s[f"{p}.attention.output.LayerNorm.bias"], eps)
        h = dense(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = _layer_norm(x + dense(h, f"{p}.output.dense"), s[f"{p}.output.LayerNorm.weight"], s[f"{p}.output.LayerNorm.bias"], eps)
        hidden.append(x)
    pooled = np.tanh(dense(x[0], "bert.pooler.dense"))
    return float(dense(pooled, "classifier")[0]), np.stack(hidden)
