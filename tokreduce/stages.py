"""What a method needs at each stage, declared by the method and served by the adapters.

Adapters never ask which method they run; they read these declarations from the reducer:

- ``reducer.stage``: where its selection is made ("vision", "pre_llm" or "llm");
- :meth:`Reducer.in_llm` -> :class:`LayerPrune`: prune at the input of decoder layer K, with the inputs it
  needs from the layers before (attention rows of the last queries, key and text states) and, optionally,
  a new choice at every decode step; or a tuple of :class:`LayerPrune` at increasing layers (a pyramid: each
  stage prunes the survivors of the one before, with its own ``select``); or :class:`LayerMerge`: merge step by
  step in the layers from layer 0 on, then prune once by attention;
- :meth:`Reducer.in_encoder` -> :class:`BlockMerge` (merge a few tokens in every encoder block) or
  :class:`LayerScore` (score the tokens with one encoder layer's attention, then select, per crop / frame, in
  the order the method emits them) or :class:`LayerwisePrune` (prune step by step in the encoder layers, with a
  score carried from layer to layer);
- :meth:`Reducer.in_decode` -> :class:`DecodePolicy`: a decode-time KV-cache policy with its own select;
- :meth:`Reducer.in_pre_llm` -> :class:`PreLLMInputs`: what a selection made before the language model needs
  besides the span's tokens (the instruction's token embeddings).

A method that acts at two stages (DyCoke: pre-LLM merge, then a decode-time cache policy) declares both in
its one file. A "pre_llm" reducer whose ``in_llm`` gives a :class:`LayerPrune` (or a tuple of them) prunes again
inside the language model: its ``select`` reduces before the LLM, the LayerPrune's ``select`` at layer K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .context import TokenContext
from .selection import Selection


@dataclass(frozen=True)
class LayerPrune:
    """Prune visual tokens at the input of decoder layer ``layer`` (K); layers >= K see only the kept ones.

    Attributes:
        layer: K >= 1.
        queries: last prompt tokens whose attention row at layer K-1 (post-softmax, float32, mean over heads and
            queries) is handed over as ``TokenContext.attention``; 0 when the method needs no attention; None for
            the model family's choice (the adapter's ``default_queries``).
        keys: hand over the key states of layer K-1 (RoPE applied, heads flattened: (1, N, Hk * D)) of the visual
            tokens as ``TokenContext.keys``, and the hidden and key states of the text tokens as ``text_hidden``
            and ``text_keys``.
        final_norm: the hidden states handed over (the span's tokens given to ``select`` and ``text_hidden``) are
            the ones entering layer K (layer K-1's output) passed through the model's final norm; the states that
            layers >= K run on are not changed.
        text_after_span: the text tokens handed over are the non-visual prompt tokens after the span (the
            question) instead of every non-visual prompt token (system prompt, BOS, ...).
        reselect_every_step: choose again at every decode step, from the attention row of that step's query at
            layer K-1 over the whole cache (needs ``queries == 1`` and no ``keys``). Layers >= K then keep their
            full KV cache and attend, through a mask made at each step, to the chosen visual entries and every
            other entry; nothing is removed physically.
        question: score with the attention rows of every non-visual prompt token after the span (the question and
            what follows it) at layer K-1, post-softmax (float32), max over heads and over those rows, as
            ``TokenContext.attention``; ``queries`` is then not used.
        own_layer: the attention row (and keys) come from layer K's own projections on its input (layer K-1's
            output, before the prune) instead of from layer K-1.
        rope: apply the rotary embedding to the queries and keys of the attention row (False: the raw q_proj /
            k_proj states, so the score has no positional decay); the keys handed over follow.
        span_softmax: the softmax of the attention row runs over each span's keys only (per head, before the
            mean over heads and queries) instead of over every key the queries see.
        select: ``(tokens (1, n, C), ctx) -> Selection`` of the n tokens for this stage; None: the reducer's
            ``select``. The n tokens are what the stages before left of the span: the outputs of a "pre_llm"
            reducer's own ``select`` (which acted before the LLM) and / or the survivors of the earlier prune
            stages; ``ctx`` is filled as above for them, ``ctx.earlier`` is the Selection those stages made
            together (in the span's original numbering; the n tokens are its outputs; None at the first stage of
            an "llm" reducer) and ``ctx.grid`` the span's original grid (N = t * h * w). Needed where a reducer
            declares several stages; after a pre-LLM stage it needs ``positions="original"``.
        knob: the method's name for ``layer`` in error messages (and the demo's layer slider).
        knob_offset: the knob's value is ``layer - knob_offset`` (PruneVid's ``selected_layer`` names the layer whose
            attention chooses, K - 1: offset 1).
    """

    layer: int
    queries: int | None = 1
    keys: bool = False
    final_norm: bool = False
    text_after_span: bool = False
    reselect_every_step: bool = False
    question: bool = False
    select: Callable[[Tensor, TokenContext], Selection] | None = None
    knob: str = "layer"
    knob_offset: int = 0
    own_layer: bool = False
    rope: bool = True
    span_softmax: bool = False


@dataclass(frozen=True)
class LayerMerge:
    """Merge visual tokens step by step inside the language model from layer 0 on, then prune once by attention.

    Merge points: the input of decoder layer 0, then in every layer the states after attention (the residual
    stream before the MLP). At each point every span still merging takes one ``step`` on the current states of
    its remaining tokens. A merge group becomes the plain mean of its members' current states, at the slot and
    position of its first token (``Selection.index``); the MLP and the later layers run on the shorter sequence.
    A span whose step reaches its budget k is done; after a span's last step, the next point (after the next
    layer's attention) prunes it to k with ``prune``, scored by that layer's attention row of the last
    ``queries`` prompt tokens over the current (merged) sequence. A span still merging at the last layer's point
    is pruned there instead. Every layer's KV cache holds exactly the sequence that layer attended to.

    Attributes:
        step: ``(tokens (1, n, C), source (n,) long, grid (t, h, w), k) -> (Selection of the n tokens, last)``, one
            merge step of a span: ``tokens`` are the current states of its n remaining tokens (sequence order),
            ``source`` their indices in the span's t * h * w grid (ascending); ``last`` ends merging.
        prune: ``(attention (1, n) float32, k) -> (1, k)`` kept indices, ascending.
        queries: last prompt tokens whose attention row (post-softmax, float32, mean over heads and queries) scores
            the prune; None for the model family's choice (the adapter's ``default_queries``).
    """

    step: Callable[[Tensor, Tensor, tuple[int, int, int], int], tuple[Selection, bool]]
    prune: Callable[[Tensor, int], Tensor]
    queries: int | None = None


@dataclass(frozen=True)
class DecodePolicy:
    """While decoding, layers >= ``layer`` attend only to the visual KV entries ``select`` chooses.

    At every decode step the adapter hands ``select`` the decode query's attention over the V visual cache
    entries of layer L-1 (mean over heads) and the attention it is compared with (:meth:`decide`). What a
    choice is worth depends on ``persist``:

    - ``persist=True``: a choice holds until the next one. ``previous`` is the attention at the last choice,
      ``None`` from ``select`` keeps the current choice, and layers >= L physically hold only the chosen
      visual entries (the others are parked so that a later choice can bring them back).
    - ``persist=False``: a choice holds for its own step only. ``previous`` is the previous step's attention,
      ``None`` means no pruning at this step (layers >= L see the whole cache), and the cache stays whole:
      layers >= L are masked from the entries not chosen.

    Attributes:
        layer: L >= 1, the first decoder layer that sees only the chosen entries.
        select: ``(attention (1, V) float32, previous (1, V) or None) -> (1, K) kept visual indices, or None``.
        persist: whether a choice holds across steps (see above).
        knob: the method's name for ``layer`` in error messages.
    """

    layer: int
    select: Callable[[Tensor, Tensor | None], Tensor | None]
    persist: bool = True
    knob: str = "layer"

    def decide(self, attention: Tensor, previous: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """One decode step of one sample: (attention (1, V), previous) -> (choice (1, K) or None, next previous).

        The next previous is what the next step's ``select`` compares with: this step's attention, or (when a
        choice persists and none was made) the attention of the standing choice.
        """
        choice = self.select(attention, previous)
        if self.persist and choice is None:
            return None, previous
        return choice, attention


@dataclass(frozen=True)
class PreLLMInputs:
    """What a reducer choosing before the language model (stage "pre_llm") needs besides the span's tokens.

    Attributes:
        instruction: hand over ``TokenContext.instruction`` (1, M, C): the language model's input embeddings of the
            sample's prompt tokens that are neither visual placeholders nor padding (the instruction and the chat
            template around it), in prompt order; (1, 0, C) for a prompt without such tokens.
    """

    instruction: bool = False


@dataclass(frozen=True)
class BlockMerge:
    """Merge tokens inside every encoder block, between attention and MLP, with proportional attention.

    Attributes:
        protected: leading tokens the method itself protects (the adapter adds CLS / register tokens).
        schedule: ``(tokens in, protected, number of blocks) -> tokens merged in each block``.
        match: ``(metric (B, N, D), r, protected) -> (Selection, order)``, one block's merge: the Selection of
            N - r tokens (``index`` ascending) and ``order`` (B, N - r) long, the token order after the merge
            (the block's output token j is the Selection's output ``order[:, j]``; protected tokens first). The
            metric is the block's keys averaged over heads. The order matters from the second merge on: it
            decides which tokens the next block's matching sees where.
        check: ``(number of blocks) -> None``, raises ``ValueError`` for knobs that cannot fit (at wrap time).
        match_for: ``(block, number of blocks) -> match`` for methods whose matching differs from block to block
            (a per-block margin); None: ``match`` in every block.
        proportional: proportional attention (log size of each key added to the attention logits) in the blocks
            after the first merge; False: plain attention, merged tokens count once.
        after_mlp: merge the block's output (after its MLP), with the output states as the metric, instead of
            merging between attention and MLP with the keys.
    """

    protected: int
    schedule: Callable[[int, int, int], list[int]]
    match: Callable[[Tensor, int, int], tuple[Selection, Tensor]]
    check: Callable[[int], None]
    match_for: Callable[[int, int], Callable[[Tensor, int, int], tuple[Selection, Tensor]]] | None = None
    proportional: bool = True
    after_mlp: bool = False

    def matcher(self, block: int, num_blocks: int) -> Callable[[Tensor, int, int], tuple[Selection, Tensor]]:
        """The match of encoder block ``block`` (of ``num_blocks``)."""
        return self.match if self.match_for is None else self.match_for(block, num_blocks)


@dataclass(frozen=True)
class LayerScore:
    """Score the tokens with one encoder layer, then select (and merge) them with the scores.

    The adapter computes, at encoder layer ``layer`` (None: the layer whose output the model uses), the
    attention each token gets (the CLS row summed over heads for encoders with a CLS token, else the attention
    received, summed over queries and averaged over heads; float32 softmax) as ``TokenContext.attention`` and
    the keys averaged over heads as ``TokenContext.metric``, then calls the reducer's ``reduce``.

    Where the encoder sees an image or video as several rows (anyres crops, video frames), each row is reduced on
    its own with ``for_rows(n, rows)``, before the projector. The kept tokens of a row reach the language model
    in this order: the protected tokens (a CLS token), the kept tokens that stand for themselves (index order),
    then the ``summaries`` (index order). Crops of one picture put their own tokens at their place in the
    stitched crop grid (read row by row), then every crop's CLS token, then every crop's summaries.

    Attributes:
        layer: encoder layer index (negative counts from the end), or None.
        keep_cls: a CLS token competes with the patches (and is protected among the kept ones) instead of
            being dropped by the model's feature selection.
        for_rows: ``(n, rows) -> reducer`` for each of ``rows`` encoder rows that together stand for ``n`` of the
            item's tokens, with its per-row budget pinned (so that a CLS token, which the adapter hands over
            with the patches, does not enter the budget). The returned reducer declares its own ``LayerScore``.
        summaries: ``(selection, ctx) -> (B, K) bool``, the kept tokens that summarise others (merged tokens) and
            go after the rest; None: every kept token stands for itself.
        logits: also hand over that layer's pre-softmax attention logits, mean over heads, as
            ``TokenContext.logits`` (the CLS token's row first where the encoder has one).
    """

    layer: int | None
    keep_cls: bool
    for_rows: Callable[[int, int], object]
    summaries: Callable[[Selection, TokenContext], Tensor] | None = None
    logits: bool = False


@dataclass(frozen=True)
class LayerwisePrune:
    """Prune patches step by step in the encoder layers up to the feature layer, a per-patch score carried along.

    Needs an encoder with a CLS token (index 0), which always stays. For every crop / frame row, at each encoder
    layer i = 0..F (F: the layer whose output the model uses) that still has more than the row's budget k of
    patches, the adapter computes from the layer's input the CLS row of the post-softmax attention per head
    ((R, H, n) float32 over [CLS, patches]) and the layer's values per head ((R, H, n, D)), runs the layer on
    the row's tokens, and calls ``step``; the patches ``keep`` leaves go on to the next layer, together with the
    carried score. Rows are reduced each on their own (the adapter batches rows of equal length). The feature
    layer's output holds the CLS token and k patches per row; they reach the language model (or the ViT head)
    in index order, like a pure pruning. Each row's budget comes from ``for_rows``, as in :class:`LayerScore`.

    Attributes:
        step: ``(layer i, F, attention (R, H, n), values (R, H, n, D), carried (R, n - 1) or None, k)
            -> (carried (R, n - 1), keep (R, n - 1) bool or None)``; None keeps every patch after layer i.
        for_rows: ``(n, rows) -> reducer`` for each of ``rows`` encoder rows that stand for ``n`` tokens; its
            ``num_kept`` of a row's patches is the row's budget k.
    """

    step: Callable[[int, int, Tensor, Tensor, Tensor | None, int], tuple[Tensor, Tensor | None]]
    for_rows: Callable[[int, int], object]
