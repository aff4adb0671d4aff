"""
Switch Sparse Autoencoders, in one file.

A Switch SAE (Mudide, Engels, Michaud, Tegmark, Schroeder de Witt, "Efficient Dictionary Learning with
Switch Sparse Autoencoders", ICLR 2025, arXiv:2410.08201) is a mixture of N small TopK SAEs behind a
router. For one language-model activation x:

    p     = softmax(W_router (x - b_router))        router probabilities over the N experts
    i     = argmax_n p_n                            top-1 routing, as in the Switch Transformer
    z     = ReLU(TopK_k(W_enc[i] (x - b_dec)))      only expert i's m = M / N encoder rows run
    x_hat = p_i W_dec[i]^T z + b_dec                the gate p_i: the router's only reconstruction gradient
    L     = |x - x_hat|^2 + alpha d N sum_n f_n P_n  f_n: share of the batch routed to n, P_n: mean p_n

With normalized activations the SAE works on s x, s fixed on the first batch, and alpha d becomes alpha V
/ 30 (V: the scaled data's total variance), so neither the loss nor the routing depends on the activations'
units (SAE.normalize_inputs_, SwitchSAE.normalize_inputs_). Outputs are in the LM's.

The decoder rows are kept at unit norm. N = 1 is exactly a TopK SAE (Gao et al. 2024), same code. The
routing is real, unlike the authors' code (dense encoder, then mask): tokens are sorted by expert, each
expert's encoder sees only its own tokens, decoding reads only the k active rows and the backward is
sparse, so FLOPs saved are time saved.

Shapes in names: B tokens in a batch, D input dim (d), M latents in all (width), N experts, m = M / N
latents per expert, K latents kept per token (k, plus AuxK's), A assignments of tokens to experts, T of
them sorted by expert, C contexts of L tokens each, G ranks.

The file reads top to bottom. The method comes first, in the order of the equations: the router (Router),
the experts and their loss (SwitchSAE: forward, forward_dense, loss and the decoder's training rules), the
other routing rules, the baselines, FLOPs, the train step, then the kernels that make routing save time.
Copied alone, that span trains an SAE. The machinery follows in the order data flows: config and the rules
between flags, capture and cache, training runs, evaluation, checkpoints and export, distributed
(torchrun), bench, command line.

    python switch_sae.py --experts 16 --k 32                # capture GPT-2 layer 8, train, evaluate
    python switch_sae.py cache --layer 8 --out acts.bin     # or capture once, then train with --acts
    python switch_sae.py bench --experts 16 --width 24576   # time a Switch step against a TopK step
"""

import functools
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# the method, in the order of the equations above: copied alone, with the imports above, it builds and trains
# an SAE (the machinery below is the command line's)


class SAEOutput(NamedTuple):
    """What every SAE's forward returns; a field an architecture does not have is None."""

    x_hat: torch.Tensor  # (B, D) the reconstruction
    acts: torch.Tensor  # (B, k) Switch's active latents before the gate, or (B, M) a baseline's latents
    idx: torch.Tensor | None = None  # (B, k) global latent indices of acts (Switch)
    probs: torch.Tensor | None = None  # (B, N') float32 router probabilities over the routed experts
    expert: torch.Tensor | None = None  # (A,) each assignment's expert, in token order: (B,) at one a token
    expert_counts: torch.Tensor | None = None  # (N,) assignments to each expert, summed over ranks
    gates: torch.Tensor | None = None  # (B, k) float32, each active latent's gate: codes are acts * gates
    gate_pre: torch.Tensor | None = None  # (B, M) the Gated baseline's gate pre-activations
    aux_acts: torch.Tensor | None = None  # (B, k_aux) AuxK's dead latents before the gate, when asked for
    aux_idx: torch.Tensor | None = None  # (B, k_aux) their global indices


class Routing(NamedTuple):
    """A batch's A assignments, in token order: assignment a sends token[a] to expert[a], whose decoded
    latents it scales by gate[a]."""

    probs: torch.Tensor  # (B, N') float32, the router's over the routed experts
    token: torch.Tensor  # (A,)
    expert: torch.Tensor  # (A,)
    gate: torch.Tensor  # (A,) float32
    counts: torch.Tensor  # (N,) assignments per expert


class Router(nn.Module):
    """The Switch rule (Fedus et al.): softmax over the experts, each token to its best one, with the gate
    p_i, its only reconstruction gradient; the balance term N sum_n f_n P_n (f_n: share of the assignments,
    P_n: mean p_n) is what alpha weighs. Its variants, as the authors' moe.py and switch1on.py wrote them:
    - experts_per_token e > 1: the e best experts, gates p_i, and one TopK over the union of their latents
      (the authors renormalise p over the e; unrenormalised, e = 1 stays the paper's rule);
    - shared_expert: the last expert takes every token with gate 1; the router and the balance see the
      other N - 1;
    - gate "heaviside": gate 1, so the router learns from the balance term alone."""

    balance_in_loss = True

    def __init__(self, experts, experts_per_token=1, shared_expert=False, gate="softmax"):
        super().__init__()
        self.experts, self.routed = experts, experts - shared_expert
        self.experts_per_token, self.shared_expert, self.gate = experts_per_token, shared_expert, gate
        self.per_token = experts_per_token + shared_expert  # assignments a token
        self.slots = self.per_token  # the most a token may have: None where it varies (found per batch)

    def scores(self, logits_BN, probs_BN):
        """What picks the experts."""
        return probs_BN

    def forward(self, logits_BN):
        B = len(logits_BN)
        probs_BN = F.softmax(logits_BN.float(), dim=-1)
        scores_BN = self.scores(logits_BN, probs_BN)  # ties (bf16): argmax takes the lowest; topk decides
        e = self.experts_per_token
        expert_BE = scores_BN.argmax(1, keepdim=True) if e == 1 else scores_BN.topk(e, dim=1).indices
        heaviside = self.gate == "heaviside"
        gate_BE = probs_BN.new_ones(expert_BE.shape) if heaviside else probs_BN.gather(1, expert_BE)
        if self.shared_expert:
            expert_BE = torch.cat([expert_BE, expert_BE.new_full((B, 1), self.routed)], 1)
            gate_BE = torch.cat([gate_BE, gate_BE.new_ones(B, 1)], 1)
        token_A = torch.arange(B, device=logits_BN.device).repeat_interleave(self.per_token)
        expert_A = expert_BE.flatten()
        return Routing(probs_BN, token_A, expert_A, gate_BE.flatten(), count(expert_A, self.experts))

    def balance(self, probs_BN, counts_N):
        """N' sum_n f_n P_n over the routed experts: 1 when uniform, N' when collapsed; f has no gradient."""
        load_N = counts_N[: self.routed].float() / counts_N[: self.routed].sum()
        return self.routed * (load_N * probs_BN.mean(0)).sum()

    batch_dependent = False  # whether a token's codes depend on the rest of its batch

    def assignments(self, batch_size):
        """Assignments a token in a batch of batch_size (their mean where they vary)."""
        return self.per_token

    def after_step_(self, counts_N, lr_share=1.0):
        """An update after each optimizer step, from the global batch's counts; lr_share: lr / peak lr."""

    def flops(self, d):
        """Its terms of a training step per token: the router's matmuls and the balance term."""
        return {"router_fwd": 2 * d * self.routed, "router_bwd": 4 * d * self.routed,  # W_router, b_router
                "load_balance": 3 * self.routed if self.balance_in_loss else 0}


class SAE(nn.Module):
    """What the SAEs here share: a decoder W_dec (M, D), one row per latent, a decoder bias b_dec, an input
    scale, and the rules the training loop calls around each step (no-ops where an architecture has none)."""

    unit_decoder = True  # rows kept at unit norm: gradient projected before the step, renormalised after
    experts, k_aux, batch_dependent = 1, 0, False  # the baselines have no router, no AuxK
    warmup_steps = 0  # of the lr

    @classmethod
    def loss_coefficients(cls, cfg, step, steps):
        """The keyword arguments of its loss at `step` of `steps`, from a config."""
        return {"l1_coeff": cfg.l1_coeff}

    def __init__(self):
        super().__init__()
        # forward multiplies its input by this and divides its output by it: callers use the LM's units
        self.register_buffer("input_scale", torch.ones(()))

    @property
    def device(self):
        return self.W_dec.device

    def expect(self, t_BX, width, what):
        """t_BX, if it is (B, width) in the SAE's dtype and on its device; else a ValueError naming both."""
        W = self.W_dec
        if isinstance(t_BX, torch.Tensor) and t_BX.dim() == 2 and t_BX.shape[1] == width \
                and (t_BX.dtype, t_BX.device) == (W.dtype, W.device):
            return t_BX
        raise ValueError(f"{what} must be (B, {width}) {W.dtype} on {W.device}; it is {describe(t_BX)}")

    def encode(self, x_BD, dense=True):
        """Codes of x (B, M), which decode is linear in: a baseline's latents, always dense."""
        if not dense:
            raise ValueError(f"a {self.arch} SAE's codes are its dense latents: encode(x, dense=False) is "
                             "Switch's")
        return self(x_BD).acts

    def decode(self, codes_BM):
        """x_hat from dense codes (B, M)."""
        codes_BM = self.expect(codes_BM, self.width, "decode's dense codes")
        return (codes_BM @ self.W_dec + self.b_dec) / self.input_scale

    def init_biases_(self, x_BD):
        """Data-dependent initialisation from the first training batch."""

    @torch.no_grad()
    def normalize_inputs_(self, x_BD):
        """Fix the input scale from the first batch: its typical tokens' mean norm becomes sqrt(d) (Gao et
        al.). Typical: norm at most 4x the median; a massive activation (an attention sink, 20-100x the
        usual norm) in the batch would otherwise set the scale of every other token. Returns them."""
        norms_B = x_BD.float().norm(dim=1)
        typical_BD = x_BD.float()[norms_B <= 4 * norms_B.median()]
        self.input_scale.fill_(math.sqrt(self.d_in) / typical_BD.norm(dim=1).mean())
        return typical_BD

    @torch.no_grad()
    def project_decoder_grad_(self):
        """Remove the gradient component along each (unit) decoder row, so a step keeps its norm."""
        if self.unit_decoder:
            parallel_M = torch.linalg.vecdot(self.W_dec.grad, self.W_dec)
            self.W_dec.grad.addcmul_(self.W_dec, parallel_M[:, None], value=-1)

    @torch.no_grad()
    def normalize_decoder_(self):
        if self.unit_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    def after_step_(self, out, lr_share=1.0):
        """What changes after each optimizer step besides the weights; out: the step's global output."""

    def summary(self):
        return f"a {self.arch} SAE of {self.width} latents"

    def flops_per_token(self, batch_size, k_aux=0):
        """Training FLOPs a token, term by term (see FLOPs), with their total and the paper's count
        (paper_encoder_only). Here, a dense SAE's: every latent of every token, forward and backward."""
        dM = self.d_in * self.width
        return totalled({"encoder_fwd": 2 * dM, "encoder_bwd": 2 * dM, "decoder_fwd": 2 * dM,
                         "decoder_bwd": 4 * dM}, 4 * dM)

    def latent_activity(self, out):
        """How many tokens each latent fired on (M,), and the active latents summed over tokens."""
        active_BM = out.acts > 0
        return active_BM.sum(0), active_BM.sum()


class SwitchSAE(SAE):
    """N TopK experts of m = width / N latents behind a router (by default the paper's top-1 rule)."""

    arch = "switch"

    default_lr = staticmethod(lambda width: 2e-4 / math.sqrt(width / 2**14))  # the paper's, after Gao et al.

    @classmethod
    def loss_coefficients(cls, cfg, step, steps):
        return {"lb_alpha": cfg.lb_alpha, "auxk_alpha": cfg.auxk_alpha}

    def __init__(self, d_in, width, experts, k, router=None, feature_scaling=False):
        super().__init__()
        if width % experts or not 0 < k <= width // experts:  # built alone; make_sae holds these to RULES
            raise ValueError(f"SwitchSAE: width {width} must be a multiple of experts {experts}, and 0 < k "
                             f"{k} <= width / experts")
        self.d_in, self.width, self.experts, self.k = d_in, width, experts, k
        self.router = router or Router(experts)
        W_enc = nn.Linear(d_in, width, bias=False).weight.detach()
        self.W_enc = nn.Parameter(W_enc.clone())  # (M, D); expert i owns rows [i m, (i+1) m)
        self.feature_scale = nn.Parameter(torch.zeros(experts)) if feature_scaling else None  # omega (N,)
        self.W_dec = nn.Parameter(W_enc / W_enc.norm(dim=1, keepdim=True))  # unit rows, tied at init only
        routed = self.router.routed  # (N', D): the routed experts'
        self.W_router = nn.Parameter(nn.Linear(d_in, routed, bias=False).weight.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.b_router = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("lb_scale", torch.tensor(float(d_in)))  # alpha's multiplier: d, as the paper

    def route(self, x_BD):
        return self.router((x_BD - self.b_router) @ self.W_router.T)

    def encoder_weight(self):
        """W_enc; with feature scaling (Scale SAE, Xu et al. 2025, arXiv:2511.05745) each expert's rows are
        pushed away from their mean row, the part all its latents share: W_i + omega_i (W_i - mean W_i),
        omega_i learnt per expert from 0. Elementwise, once a step, so routing still saves the matmuls."""
        if self.feature_scale is None:
            return self.W_enc
        W_NmD = self.W_enc.view(self.experts, -1, self.d_in)
        spread_NmD = W_NmD - W_NmD.mean(1, keepdim=True)
        return (W_NmD + self.feature_scale[:, None, None] * spread_NmD).view_as(self.W_enc)

    def forward(self, x_BD, dead_M=None):
        """The routed fast path: each assignment's token copied to its expert, sorted by expert, each
        expert's TopK on its own tokens, then each token's k best over its experts. With dead_M (M,) bool
        (one expert a token), each token also gets the top k_aux = min(d/2, m) dead latents of its expert
        (AuxK), in aux_acts and aux_idx."""
        x_BD = self.expect(x_BD, self.d_in, "x") * self.input_scale
        r = self.route(x_BD)
        x_AD = x_BD if self.router.slots == 1 else x_BD[r.token]
        x_TD, expert_T, counts_here, combine = self.dispatch(x_AD, r.expert, r.counts)
        k_aux = self.k_aux if dead_M is not None and dead_M.any() else 0
        W_enc_MD = self.encoder_weight()
        acts_TK, idx_TK = RoutedTopK.apply(x_TD, W_enc_MD, self.b_dec, expert_T, counts_here, self.k, dead_M,
                                           k_aux)
        decoded_BD, acts_BK, idx_BK, gates_BK = combine(acts_TK, idx_TK, r)
        aux = (acts_BK[:, self.k :], idx_BK[:, self.k :]) if k_aux else (None, None)
        return SAEOutput((decoded_BD + self.b_dec) / self.input_scale, acts_BK[:, : self.k],
                         idx_BK[:, : self.k], r.probs, r.expert, r.counts, gates=gates_BK, aux_acts=aux[0],
                         aux_idx=aux[1])

    def dispatch(self, x_AD, expert_A, counts_N):
        """Hand each assignment to its expert: here, sort them by expert. Returns the sorted tokens, their
        experts, tokens per expert, and combine(acts, idx, routing), which merges and decodes the latents
        back in token order. ExpertParallelSwitchSAE sends each token to its expert's rank and back."""
        order_A = expert_A.argsort(stable=True)
        unsort_A = order_A.argsort()
        combine = lambda acts_TK, idx_TK, r: self.merge(acts_TK[unsort_A], idx_TK[unsort_A], r)
        return x_AD[order_A], expert_A[order_A], counts_N, combine

    def merge(self, acts_AK, idx_AK, r):
        """Each token's k best latents over its experts' (by gated value: the TopK over their union, since an
        expert's candidates hold its k best), decoded and gated; with one expert a token, its own."""
        k, B, gate_A = self.k, len(r.probs), r.gate
        if self.router.slots == 1:  # the gate after the sum, as the paper writes it
            decoded_BD = SparseDecode.apply(acts_AK[:, :k], idx_AK[:, :k], self.W_dec)
            gated_BD = decoded_BD * gate_A[:, None].to(decoded_BD.dtype)
            return gated_BD, acts_AK, idx_AK, gate_A[:, None].expand(-1, k)
        # a token's candidates fill its row's first slots of k; an empty slot is never chosen while a
        # candidate is left, and fills a token no expert took (zeros: x_hat = b_dec; distinct indices)
        tokens_B = count(r.token, B)
        S = self.router.slots or max(1, int(tokens_B.max()) if B else 1)
        first_B = tokens_B.cumsum(0) - tokens_B  # each token's first assignment
        where_A = r.token * S + torch.arange(len(r.token), device=r.token.device) - first_B[r.token]
        fill = lambda empty, rows_AK: empty.index_copy(0, where_A, rows_AK).view(B, S * k)
        gates_AK = gate_A[:, None].expand(-1, k)
        acts, gates = fill(acts_AK.new_zeros(B * S, k), acts_AK), fill(gates_AK.new_zeros(B * S, k), gates_AK)
        idx = fill(torch.arange(S * k, device=idx_AK.device).repeat(B).view(B * S, k), idx_AK)
        score = fill(torch.full((B * S, k), -math.inf, device=acts_AK.device), (acts_AK * gates_AK).float())
        best_BK = score.topk(k, dim=1, sorted=False).indices
        acts_BK, idx_BK, gates_BK = (t.gather(1, best_BK) for t in (acts, idx, gates))
        coef_BK = acts_BK * gates_BK.to(acts_BK.dtype)
        return SparseDecode.apply(coef_BK, idx_BK, self.W_dec), acts_BK, idx_BK, gates_BK

    def forward_dense(self, x_BD):
        """The method as written (and as the authors' code runs it): every expert's encoder on every token,
        each latent gated by its expert's gate (0 off the token's experts), TopK over them. O(M d) a token;
        forward is tested against it."""
        x_BD = self.expect(x_BD, self.d_in, "x") * self.input_scale
        r = self.route(x_BD)
        B, m = len(x_BD), self.width // self.experts
        gate_BN = r.gate.new_zeros(B, self.experts).index_put((r.token, r.expert), r.gate)
        mine_BN = torch.zeros(B, self.experts, dtype=torch.bool, device=x_BD.device).index_put(
            (r.token, r.expert), torch.tensor(True, device=x_BD.device))
        gate_BM, mine_BM = gate_BN.repeat_interleave(m, 1), mine_BN.repeat_interleave(m, 1)
        pre_BM = ((x_BD - self.b_dec) @ self.encoder_weight().T).masked_fill(~mine_BM, -math.inf)
        idx_BK = (pre_BM.relu() * gate_BM).topk(self.k, dim=1).indices
        acts_BK, gates_BK = pre_BM.gather(1, idx_BK).relu(), gate_BM.gather(1, idx_BK)
        z_BM = torch.zeros_like(pre_BM).scatter(1, idx_BK, acts_BK * gates_BK.to(acts_BK.dtype))
        x_hat_BD = z_BM @ self.W_dec + self.b_dec
        return SAEOutput(x_hat_BD / self.input_scale, acts_BK, idx_BK, r.probs, r.expert, r.counts,
                         gates=gates_BK)

    def encode(self, x_BD, dense=False):
        """Codes of x: (values, global latent indices), each (B, k), or with dense=True one (B, M) tensor.
        The values carry the router's gate, so decode is linear in them: decode(encode(x)) = x_hat."""
        out = self(x_BD)
        vals_BK = out.acts * out.gates.to(out.acts.dtype)
        if dense:
            return vals_BK.new_zeros(len(x_BD), self.width).scatter_(1, out.idx, vals_BK)
        return vals_BK, out.idx

    def decode(self, codes):
        """x_hat from codes as encode gives them: (values, indices), or a dense (B, M) tensor."""
        if isinstance(codes, torch.Tensor):
            return super().decode(codes)
        if not isinstance(codes, (tuple, list)) or len(codes) != 2:
            raise ValueError(f"decode takes codes as encode gives them, (values, indices) or a dense (B, "
                             f"{self.width}) tensor; it got {describe(codes)}")
        vals_BK, idx_BK = codes
        self.expect(vals_BK, self.k, "decode's values")
        fits = isinstance(idx_BK, torch.Tensor) and (idx_BK.shape, idx_BK.dtype, idx_BK.device) == (
            vals_BK.shape, torch.long, vals_BK.device)
        if not fits or idx_BK.numel() and not 0 <= idx_BK.min() <= idx_BK.max() < self.width:
            raise ValueError(f"decode's indices must be {tuple(vals_BK.shape)} torch.int64 latents 0.."
                             f"{self.width - 1} on {vals_BK.device}, as encode gives them; they are "
                             f"{describe(idx_BK)}")
        return (SparseDecode.apply(vals_BK, idx_BK, self.W_dec) + self.b_dec) / self.input_scale

    def loss(self, x_BD, out, lb_alpha=3.0, auxk_alpha=0.0):
        """Reconstruction + lb_alpha * lb_scale * load balance (+ auxk_alpha * AuxK), in the scaled units
        the SAE works in; parts["recon"] is in the LM's. Returns (loss, parts)."""
        recon = squared_error(out.x_hat, x_BD)
        balance = self.router.balance(out.probs, out.expert_counts)
        scale2 = self.input_scale**2
        if self.router.balance_in_loss:
            loss = recon * scale2 + lb_alpha * self.lb_scale * balance
        else:  # reported, not trained on
            loss, balance = recon * scale2, balance.detach()
        parts = {"recon": recon, "balance": balance}
        if out.aux_acts is not None:  # AuxK: dead latents rebuild what the live ones missed (Gao et al.)
            gate_B = out.gates[:, 0].detach()  # it trains the dead latents, not the router
            aux_acts_BK = out.aux_acts * gate_B[:, None].to(out.aux_acts.dtype)
            error_hat_BD = SparseDecode.apply(aux_acts_BK, out.aux_idx, self.W_dec)
            error_hat_BD = error_hat_BD / self.input_scale
            parts["auxk"] = squared_error(error_hat_BD, (x_BD - out.x_hat).detach())
            loss = loss + auxk_alpha * scale2 * parts["auxk"]
        return loss, parts

    @torch.no_grad()
    def init_biases_(self, x_BD):
        """b_dec = b_router = the geometric median of the first batch, as the authors start them."""
        self.b_dec.copy_(geometric_median(x_BD.float() * self.input_scale))
        self.b_router.copy_(self.b_dec)

    @torch.no_grad()
    def normalize_inputs_(self, x_BD):
        """Also weigh the load balance in the scaled data's units: alpha V / 30, V the typical tokens' total
        variance, instead of alpha d, which holds in GPT-2's raw units only (elsewhere the balance can
        swamp the reconstruction, or vanish beside it). The 30: the paper's alpha d (alpha 3) is about twice
        its final MSE, and an SAE explaining 95% of the variance has MSE V / 20; alpha V itself weighed the
        balance up to 30x the reconstruction and lost to 10-30x smaller weights on SmolLM2 and another LM."""
        typical_BD = super().normalize_inputs_(x_BD)
        variance = (typical_BD * self.input_scale).var(0, correction=0).sum()
        self.lb_scale.fill_(variance / 30)
        return typical_BD

    @property
    def k_aux(self):  # AuxK's latents a token, when some are dead: Gao et al.'s d/2, at most the expert's m
        return min(self.d_in // 2, self.width // self.experts)

    def after_step_(self, out, lr_share=1.0):
        self.router.after_step_(out.expert_counts, lr_share)

    @property
    def batch_dependent(self):
        return self.router.batch_dependent

    def flops_per_token(self, batch_size, k_aux=0):
        """k_aux: the AuxK latents of a step with dead latents (min(d/2, m)), decoded and trained beside the k
        live ones. Each of a token's experts runs its m latents and trains its k candidates."""
        d, m, k = self.d_in, self.width // self.experts, self.k
        per_token = self.router.assignments(batch_size)
        terms = {**self.router.flops(d),
                 "encoder_fwd": 2 * d * m * per_token,
                 "encoder_bwd": 2 * per_token * k * d + 2 * self.width * d / batch_size,  # b_dec's: a batch
                 "decoder_fwd": 2 * k * d,  # only the k active rows
                 "decoder_bwd": 4 * k * d}  # grads of W_dec rows and of the latents
        if k_aux:  # the encoder's pre-activations are shared; the extra work is sparse, k_aux rows a token
            terms.update(auxk_decoder_fwd=2 * k_aux * d, auxk_decoder_bwd=4 * k_aux * d,
                         auxk_encoder_bwd=2 * k_aux * d)
        if self.feature_scale is not None:  # elementwise on W_enc once a batch: 4 M d forward, 6 M d backward
            terms["feature_scaling"] = 10 * self.width * d / batch_size
        return totalled(terms, 4 * d * m * per_token)

    def latent_activity(self, out):
        active_BK = out.acts > 0
        fired_M = torch.zeros(len(self.W_dec), dtype=torch.long, device=active_BK.device).index_add_(
            0, out.idx.flatten(), active_BK.flatten().long())
        return fired_M, active_BK.sum()

    def saelens(self):
        """SAELens's architecture, whether its encoder subtracts b_dec, the tensors (in the scaled units) and
        the cfg fields: topk for one expert, else the README's switch class, with its rule's fields."""
        tensors = {"W_enc": self.encoder_weight().T, "b_enc": torch.zeros(self.width, device=self.device),
                   "W_dec": self.W_dec, "b_dec": self.b_dec}
        fields = {"k": self.k, "rescale_acts_by_decoder_norm": False}
        if self.experts == 1:
            return "topk", True, tensors, fields
        r = self.router
        tensors.update(W_router=self.W_router, b_router=self.b_router)
        if isinstance(r, AuxFreeRouter):
            tensors["selection_bias"] = r.selection_bias  # unit-free: not scaled
        rule = {"experts_per_token": r.experts_per_token if r.experts_per_token > 1 else None,
                "shared_expert": r.shared_expert or None, "heaviside": r.gate == "heaviside" or None,
                "aux_free": isinstance(r, AuxFreeRouter) or None}
        rule = {name: value for name, value in rule.items() if value is not None}
        return "switch", True, tensors, {**fields, "n_experts": self.experts, **rule}

    def summary(self):
        scaled = ", feature scaling" if self.feature_scale is not None else ""
        return f"{self.experts} experts x {self.width // self.experts} latents, k={self.k}{scaled}"


def describe(t):
    """A tensor's shape, dtype and device (and range, if it holds integers), or what else it is."""
    if not isinstance(t, torch.Tensor):
        return repr(t)
    held = f" holding {t.min().item()}..{t.max().item()}" if t.numel() and not t.is_floating_point() else ""
    return f"{tuple(t.shape)} {t.dtype} on {t.device}{held}"


def squared_error(x_hat_BD, x_BD):
    """Sum over d of (x_hat - x)^2, mean over tokens: the paper's MSE."""
    return (x_hat_BD - x_BD).pow(2).sum(-1).mean()


@torch.no_grad()
def geometric_median(points_BD, iters=100, tol=1e-5):
    """Weiszfeld's algorithm; the Switch SAE's biases start there."""
    median = points_BD.mean(0)
    for _ in range(iters):
        weights = 1 / (points_BD - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points_BD).sum(0) / weights.sum()
        if (new - median).norm() < tol * median.norm().clamp_min(1):
            return new
        median = new
    return median


# -----------------------------------------------------------------------------
# the other routing rules and the baselines


class AuxFreeRouter(Router):
    """Loss-free balancing (Wang et al. 2024, arXiv:2408.15664; DeepSeek-V3): a per-expert bias, added to the
    router probabilities (their gating scores) to pick the experts and nowhere else, moves by
    rate * sign(mean load - load) after each step; no balance term in the loss. The rate follows the lr's
    schedule (times lr / peak lr), so the bias settles as the weights do: DeepSeek-V3 stops it for the last
    stretch; at the full rate it kept re-routing tokens while the lr, and so the weights, came to rest."""

    balance_in_loss = False

    def __init__(self, experts, experts_per_token=1, shared_expert=False, gate="softmax", balance_rate=1e-3):
        super().__init__(experts, experts_per_token, shared_expert, gate)
        self.balance_rate = balance_rate
        self.register_buffer("selection_bias", torch.zeros(self.routed))

    def scores(self, logits_BN, probs_BN):
        return probs_BN + self.selection_bias  # Wang et al.'s: on the scores in [0, 1], so u has no units

    @torch.no_grad()
    def after_step_(self, counts_N, lr_share=1.0):
        load_N = counts_N[: self.routed].float()
        self.selection_bias.add_(self.balance_rate * lr_share * (load_N.mean() - load_N).sign())


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022, arXiv:2202.09368): each routed expert takes the C = ceil(capacity B /
    N') tokens of the batch with the highest probability for it, with that gate; a token may go to several
    experts, or to none (then x_hat = b_dec). Balanced by construction: no balance term. Codes depend on
    the batch: a lone token is taken by every expert (C = 1), so encode and evaluation route batches of
    the training size for codes as trained."""

    balance_in_loss = False

    def __init__(self, experts, shared_expert=False, gate="softmax", capacity=1.0):
        super().__init__(experts, 1, shared_expert, gate)
        self.capacity, self.slots, self.per_token = capacity, None, None

    batch_dependent = True

    def taken(self, B):
        """C: tokens an expert takes from a batch of B."""
        return min(B, math.ceil(self.capacity * B / self.routed))

    def assignments(self, batch_size):
        return self.taken(batch_size) * self.routed / batch_size + self.shared_expert

    def forward(self, logits_BN):
        B, device = len(logits_BN), logits_BN.device
        probs_BN = F.softmax(logits_BN.float(), dim=-1)
        token_CN = probs_BN.topk(self.taken(B), dim=0).indices
        token_A = token_CN.T.flatten()
        expert_A = torch.arange(self.routed, device=device).repeat_interleave(len(token_CN))
        gate_A = probs_BN.new_ones(len(token_A)) if self.gate == "heaviside" else probs_BN[token_A, expert_A]
        if self.shared_expert:
            token_A = torch.cat([token_A, torch.arange(B, device=device)])
            expert_A = torch.cat([expert_A, expert_A.new_full((B,), self.routed)])
            gate_A = torch.cat([gate_A, gate_A.new_ones(B)])
        order_A = token_A.argsort(stable=True)  # in token order, as Routing is
        token_A, expert_A = token_A[order_A], expert_A[order_A]
        return Routing(probs_BN, token_A, expert_A, gate_A[order_A], count(expert_A, self.experts))


def make_router(experts, router="switch", experts_per_token=1, shared_expert=False, gate="softmax",
                balance="loss", balance_rate=1e-3, capacity=1.0):
    if router == "expert-choice":
        return ExpertChoiceRouter(experts, shared_expert, gate, capacity)
    if balance == "aux-free":
        return AuxFreeRouter(experts, experts_per_token, shared_expert, gate, balance_rate)
    return Router(experts, experts_per_token, shared_expert, gate)


class ReluSAE(SAE):
    """Baseline: ReLU SAE, L1 penalty weighted by decoder norms (Anthropic's April 2024 update)."""

    arch = "relu"
    unit_decoder = False  # its norms float and are paid for in the L1 term
    default_lr = staticmethod(lambda width: 5e-5)  # Anthropic's

    @classmethod
    def loss_coefficients(cls, cfg, step, steps):
        """The L1 weight warms up linearly over the first 5% of steps."""
        return {"l1_coeff": cfg.l1_coeff * min(1.0, (step + 1) / max(1, 0.05 * steps))}

    def __init__(self, d_in, width):
        super().__init__()
        self.d_in, self.width = d_in, width
        W_dec = torch.randn(width, d_in)
        self.W_dec = nn.Parameter(0.1 * W_dec / W_dec.norm(dim=1, keepdim=True))  # rows of norm 0.1
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())  # encoder = decoder transpose at init
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def forward(self, x_BD):
        f_BM = F.relu(self.expect(x_BD, self.d_in, "x") * self.input_scale @ self.W_enc.T + self.b_enc)
        return SAEOutput((f_BM @ self.W_dec + self.b_dec) / self.input_scale, f_BM)

    def loss(self, x_BD, out, l1_coeff=5.0):
        recon = squared_error(out.x_hat, x_BD)
        l1 = (out.acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        return recon * self.input_scale**2 + l1_coeff * l1, {"recon": recon, "l1": l1}

    def saelens(self):
        return "standard", False, {"W_enc": self.W_enc.T, "b_enc": self.b_enc, "W_dec": self.W_dec,
                                   "b_dec": self.b_dec}, {}


class GatedSAE(SAE):
    """Baseline: Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude
    path (the gate's weights rescaled per latent) decides how strongly."""

    arch = "gated"
    default_lr, warmup_steps = staticmethod(lambda width: 3e-4), 1000  # Rajamanoharan et al.'s

    def __init__(self, d_in, width):
        super().__init__()
        self.d_in, self.width = d_in, width
        W_dec = torch.randn(width, d_in)
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.W_gate = nn.Parameter(self.W_dec.detach().clone())
        self.r_mag = nn.Parameter(torch.zeros(width))
        self.b_gate = nn.Parameter(torch.zeros(width))
        self.b_mag = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def forward(self, x_BD):
        pre_BM = (self.expect(x_BD, self.d_in, "x") * self.input_scale - self.b_dec) @ self.W_gate.T
        gate_pre_BM = pre_BM + self.b_gate
        f_BM = (gate_pre_BM > 0) * F.relu(pre_BM * self.r_mag.exp() + self.b_mag)
        return SAEOutput((f_BM @ self.W_dec + self.b_dec) / self.input_scale, f_BM, gate_pre=gate_pre_BM)

    def loss(self, x_BD, out, l1_coeff=5.0):
        """Reconstruction + L1 on the gate + the gate's own reconstruction through the frozen decoder, in the
        scaled units; parts["recon"] in the LM's."""
        recon = squared_error(out.x_hat, x_BD)
        gate_BM = F.relu(out.gate_pre)
        l1 = gate_BM.sum(-1).mean()
        aux = squared_error(gate_BM @ self.W_dec.detach() + self.b_dec.detach(), x_BD * self.input_scale)
        return recon * self.input_scale**2 + l1_coeff * l1 + aux, {"recon": recon, "l1": l1, "aux": aux}

    def saelens(self):
        return "gated", True, {"W_enc": self.W_gate.T, "W_dec": self.W_dec, "b_dec": self.b_dec,
                               "b_gate": self.b_gate, "b_mag": self.b_mag, "r_mag": self.r_mag}, {}

    def flops_per_token(self, batch_size, k_aux=0):
        """Also the gate's gradient through r_mag and its reconstruction through the frozen decoder."""
        dM = self.d_in * self.width
        return totalled({"encoder_fwd": 2 * dM, "encoder_bwd": 4 * dM, "decoder_fwd": 2 * dM,
                         "decoder_bwd": 4 * dM, "gate_aux_fwd": 2 * dM, "gate_aux_bwd": 2 * dM}, 4 * dM)


ARCHS = {"switch": SwitchSAE, "relu": ReluSAE, "gated": GatedSAE}


# -----------------------------------------------------------------------------
# FLOPs: each SAE class counts its own training FLOPs a token (flops_per_token), term by term as this code
# runs them: forward and backward of encoder, decoder and router, at the batch size (b_dec's gradient and
# expert choice's capacity depend on it). The paper counts the encoder alone, 2 d m forward + 2 d m
# backward: its figure is kept beside ours. Tests hold every term against torch's FlopCounterMode.


def totalled(terms, paper_encoder_only):
    return {**terms, "total": sum(terms.values()), "paper_encoder_only": paper_encoder_only}


def training_flops(sae, batch_size, steps, auxk_steps):
    """A run's training FLOPs: its steps', with AuxK's extra work on the auxk_steps it ran."""
    flops, auxk_flops = (sae.flops_per_token(batch_size, k_aux)["total"] for k_aux in (0, sae.k_aux))
    return (flops * steps + (auxk_flops - flops) * auxk_steps) * batch_size


# -----------------------------------------------------------------------------
# the train step


class SingleProcess:
    """How training talks to other ranks, here none (TorchDistributed, in the distributed section, is the same
    interface over torch.distributed): all_reduce(t) sums t over ranks in place; gather_rows(t) joins every
    rank's rows of t; shard_rows(t) is this rank's block of rows of t; sum_batch_stats(out) sums the expert
    counts over all ranks' batches; average_gradients(sae) makes the gradients those of the mean loss over
    all ranks' tokens."""

    rank, ranks = 0, 1

    def all_reduce(self, t):
        return t

    gather_rows = shard_rows = sum_batch_stats = all_reduce

    def average_gradients(self, sae):
        pass


SINGLE_PROCESS = SingleProcess()


def is_sharded(p):
    """Expert-parallel shards carry this flag: each rank holds other rows, never to be averaged."""
    return getattr(p, "expert_shard", False)


def base_lr(cfg):
    """--lr, or the rule of the run's kind of SAE."""
    return cfg.lr or ARCHS[cfg.arch].default_lr(cfg.width)


def lr_at(cfg, step, steps):
    """Constant (after the kind's warm-up), then linear decay to 0 after decay_start."""
    base = base_lr(cfg) * min(1.0, (step + 1) / max(1, ARCHS[cfg.arch].warmup_steps))
    decay_from = int(cfg.decay_start * steps)
    return base if step < decay_from else base * (steps - step) / max(1, steps - decay_from)


def make_optimizer(sae):
    return torch.optim.Adam(sae.parameters(), lr=0.0, betas=(0.9, 0.999), fused=True)


def squared_norm(t):
    """|t|^2 as dot products: twice vector_norm's speed on CPU. In chunks: dot counts in 32-bit ints."""
    return sum(chunk.dot(chunk) for chunk in t.flatten().split(2**30))


def clip_gradients(sae, max_norm, comms=SINGLE_PROCESS):
    """torch.nn.utils.clip_grad_norm_'s rule, with the norm taken over all ranks' expert shards; max_norm 0
    leaves the gradients as they are."""
    grads = [p for p in sae.parameters() if p.grad is not None]
    if not max_norm:
        return
    total = torch.stack([squared_norm(p.grad) for p in grads if not is_sharded(p)]).sum()
    sharded = [squared_norm(p.grad) for p in grads if is_sharded(p)]
    if sharded:
        total = total + comms.all_reduce(torch.stack(sharded).sum())
    scale = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
    for p in grads:
        p.grad.mul_(scale)


@torch.no_grad()
def prepare_gradients(sae, max_norm, comms=SINGLE_PROCESS):
    """Between backward and the optimizer: keep the decoder rows' norms, clip the gradient norm."""
    sae.project_decoder_grad_()
    clip_gradients(sae, max_norm, comms)


@functools.cache  # one compiled wrapper per function, so Dynamo's cache is reused step after step
def compiled(fn):
    return torch.compile(fn)


@torch.no_grad()
def batch_fve(x_BD, x_hat_BD):
    """1 - sum_j Var(x_j - x_hat_j) / sum_j Var(x_j), with sum_j Var(r_j) = E|r|^2 - |E r|^2."""
    variance = lambda r_BD: r_BD.pow(2).sum(1).mean() - r_BD.mean(0).pow(2).sum()
    return 1 - variance(x_BD - x_hat_BD) / variance(x_BD)


def train_step(sae, opt, x_BD, lr, coefs, grad_clip=1.0, comms=SINGLE_PROCESS, dead_M=None, compile=False,
               lr_share=1.0):
    """One optimizer step of any SAE here. coefs: the keyword arguments of sae.loss; dead_M: AuxK's dead
    latents, or None; lr_share: lr over the run's peak, for what moves outside the optimizer. Returns the
    output and the loss parts (tensors, not synced)."""
    out = comms.sum_batch_stats(sae(x_BD) if dead_M is None else sae(x_BD, dead_M))
    loss, parts = sae.loss(x_BD, out, **coefs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    comms.average_gradients(sae)
    maybe_compiled = compiled if compile else lambda fn: fn
    maybe_compiled(prepare_gradients)(sae, grad_clip, comms)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    maybe_compiled(type(sae).normalize_decoder_)(sae)  # the class's function: one compiled wrapper a class
    sae.after_step_(out, lr_share)
    parts.update(loss=loss.detach(), fve=batch_fve(x_BD, out.x_hat.detach()))
    return out, parts


def tick_dead_clock(tokens_since_fired_M, sae, out, comms=SINGLE_PROCESS):
    """Count the global batch's tokens since each latent last fired."""
    fired_M = sae.latent_activity(out)[0] > 0
    if not is_sharded(sae.W_dec):  # an expert shard saw every token routed to it; replicas pool theirs
        fired_M = comms.all_reduce(fired_M.float()) > 0
    tokens_since_fired_M.add_(len(out.x_hat) * comms.ranks).masked_fill_(fired_M, 0)


# -----------------------------------------------------------------------------
# how routing saves time: each expert's encoder sees only its tokens, decoding reads only the k active rows,
# and the backward is as sparse as the forward


GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # public from torch 2.9


def use_grouped_mm(x_TD, m):
    """One grouped matmul for all experts on CUDA (Ampere or newer), where its bf16 operands are 16-byte
    aligned (d and m multiples of 8); a loop over experts elsewhere."""
    return (x_TD.is_cuda and GROUPED_MM is not None and x_TD.shape[1] % 8 == 0 and m % 8 == 0
            and torch.cuda.get_device_capability(x_TD.device) >= (8, 0))


def count(values, n):
    """How often each of 0..n-1 occurs in `values`: torch.bincount without its host sync on CUDA."""
    counts_n = torch.zeros(n, dtype=torch.long, device=values.device)
    return counts_n.scatter_add_(0, values, torch.ones_like(values))


def expert_matmul(x_TD, W_enc_MD, counts_N):
    """Pre-activations (T, m): row t against its own expert's m encoder rows only (bf16 on CUDA).
    x_TD is sorted by expert; counts_N says how many rows each expert owns."""
    N = len(counts_N)
    W_NmD = W_enc_MD.view(N, -1, W_enc_MD.shape[1])
    if use_grouped_mm(x_TD, W_NmD.shape[1]):
        dtype = torch.bfloat16 if x_TD.is_cuda else x_TD.dtype  # tensor cores; fp32 master weights stay fp32
        offsets = counts_N.cumsum(0).to(torch.int32)  # stays on the device: no host sync
        return GROUPED_MM(x_TD.to(dtype), W_NmD.to(dtype).transpose(1, 2), offs=offsets)  # TopK takes bf16
    pre_Tm = x_TD.new_empty(len(x_TD), W_NmD.shape[1])
    sizes = counts_N.tolist()
    for x_i, W_i, pre_i in zip(x_TD.split(sizes), W_NmD, pre_Tm.split(sizes)):
        torch.mm(x_i, W_i.T, out=pre_i)
    return pre_Tm


def topk_rows(pre_Tm, k, group=8):
    """pre.topk(k, dim=1, sorted=False), in two stages on CPU for wide rows (~2x faster there): a row's
    top k lie in the k groups of `group` neighbours with the largest maxima, so only those are searched."""
    T, m = pre_Tm.shape
    if pre_Tm.is_cuda or m % group or m < 32 * k:
        return pre_Tm.topk(k, dim=1, sorted=False)
    groups_TGg = pre_Tm.view(T, m // group, group)
    _, best_Tk = groups_TGg.amax(dim=2).topk(k, dim=1, sorted=False)
    candidates_TKg = groups_TGg.gather(1, best_Tk[:, :, None].expand(-1, -1, group)).view(T, k * group)
    vals_TK, loc_TK = candidates_TKg.topk(k, dim=1, sorted=False)
    return vals_TK, best_Tk.gather(1, loc_TK // group) * group + loc_TK % group


def csr_matrix(row_starts, cols, values, shape):
    with warnings.catch_warnings():  # sparse CSR is marked beta; its products here are tested against dense
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(row_starts, cols, values, shape, check_invariants=False)


def scatter_rows(idx_TK, coef_TK, vec_TD, n_rows):
    """G (n_rows, D) with G[idx[t,k]] += coef[t,k] * vec[t], as one sparse (CSR) matrix product, so the
    (T*K, D) products are never materialised: the weight gradient of a sparse encoder or decoder."""
    T, K = idx_TK.shape
    flat = idx_TK.flatten()
    order = flat.argsort(stable=True)  # stable: each row's columns (tokens) sorted, sums deterministic
    row_starts = torch.zeros(n_rows + 1, dtype=torch.long, device=flat.device)
    row_starts[1:] = count(flat, n_rows).cumsum(0)
    G = csr_matrix(row_starts, order // K, coef_TK.flatten()[order].float(), (n_rows, T))
    # CPU: addmm with beta=0 into an uninitialised buffer saves the product's own zero fill and copy (~10 ms
    # at width 24576). CUDA: cuSPARSE is not documented to ignore C when beta=0; a memset costs ~nothing.
    out = (torch.zeros if vec_TD.is_cuda else torch.empty)(n_rows, vec_TD.shape[1], device=vec_TD.device)
    # sparse products want float32 on some backends
    return torch.addmm(out, G, vec_TD.float(), beta=0, out=out).to(vec_TD.dtype)


def gathered_dots(idx_TK, W_MD, vec_TD):
    """<vec[t], W[idx[t,k]]> for every (t, k), as a sampled (SDDMM) product: no (T, K, D) gather.
    Each row of idx holds distinct indices (a TopK's), as a CSR pattern must."""
    T, K = idx_TK.shape
    cols_TK, order_TK = idx_TK.sort(dim=1)  # CSR wants each row's columns sorted
    row_starts = torch.arange(0, T * K + 1, K, device=idx_TK.device)
    pattern = csr_matrix(row_starts, cols_TK.flatten(), vec_TD.new_zeros(T * K, dtype=torch.float32),
                         (T, len(W_MD)))
    # float32 and dense layouts: CUDA's SDDMM has no bf16 kernel and wants row- or column-major inputs
    dots_TK = torch.sparse.sampled_addmm(pattern, vec_TD.float().contiguous(), W_MD.float().T, beta=0)
    dots_TK = dots_TK.values().view(T, K)
    return torch.empty_like(dots_TK).scatter_(1, order_TK, dots_TK).to(vec_TD.dtype)


class SparseDecode(torch.autograd.Function):
    """sum_k coef[t,k] W[idx[t,k]], idx distinct within each row. The forward and the latent gradients
    read only the k active rows of W (fp32 W; other dtypes are cast whole); W's (M, D) gradient is
    written once by one sparse product, not zero-filled and then added to row by row."""

    @staticmethod
    def forward(ctx, coef_TK, idx_TK, W_MD):
        ctx.save_for_backward(coef_TK, idx_TK, W_MD)
        return F.embedding_bag(idx_TK, W_MD, per_sample_weights=coef_TK, mode="sum")

    @staticmethod
    def backward(ctx, grad_TD):
        coef_TK, idx_TK, W_MD = ctx.saved_tensors
        grad_coef = gathered_dots(idx_TK, W_MD, grad_TD) if ctx.needs_input_grad[0] else None
        grad_W = scatter_rows(idx_TK, coef_TK, grad_TD, len(W_MD)) if ctx.needs_input_grad[2] else None
        return grad_coef, None, grad_W


class RoutedTopK(torch.autograd.Function):
    """Encoder of tokens sorted by expert: dense matmul within each token's expert, TopK, ReLU.
    Optionally also the top k_aux of the expert's dead latents (AuxK). The backward is sparse: only the
    selected (token, latent) pairs carry gradient, so it costs O(k d) per token instead of O(m d)."""

    @staticmethod
    def forward(ctx, x_TD, W_enc_MD, b_dec_D, expert_T, counts_N, k, dead_M, k_aux):
        m = len(W_enc_MD) // len(counts_N)
        xc_TD = x_TD - b_dec_D
        pre_Tm = expert_matmul(xc_TD, W_enc_MD, counts_N)
        offset_T1 = expert_T[:, None] * m
        vals_TK, loc_TK = topk_rows(pre_Tm, k)
        idx_TK = loc_TK + offset_T1
        if k_aux:
            pre_Tm.masked_fill_(~dead_M.view(len(counts_N), m)[expert_T], -math.inf)
            aux_vals, aux_loc = pre_Tm.topk(k_aux, dim=1, sorted=False)
            vals_TK, idx_TK = torch.cat([vals_TK, aux_vals], 1), torch.cat([idx_TK, aux_loc + offset_T1], 1)
        acts_TK = vals_TK.to(x_TD.dtype).relu()
        ctx.save_for_backward(xc_TD, W_enc_MD, idx_TK, acts_TK)
        ctx.mark_non_differentiable(idx_TK)
        return acts_TK, idx_TK

    @staticmethod
    def backward(ctx, grad_acts_TK, _):
        xc_TD, W_enc_MD, idx_TK, acts_TK = ctx.saved_tensors
        g_TK = grad_acts_TK * (acts_TK > 0)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_TK, W_enc_MD, per_sample_weights=g_TK, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows(idx_TK, g_TK, xc_TD, len(W_enc_MD))
        if ctx.needs_input_grad[2]:  # sum over tokens first: one (M,) x (M, D) product, not T of them
            per_latent_M = g_TK.new_zeros(len(W_enc_MD)).index_add_(0, idx_TK.flatten(), g_TK.flatten())
            grad_b = -(per_latent_M[None] @ W_enc_MD)[0]
        return grad_x, grad_W, grad_b, None, None, None, None, None


# =============================================================================
# machinery, in the order data flows: config and the rules between flags, capture and cache, training runs,
# evaluation, checkpoints and export, distributed, bench, command line

import argparse
import contextlib
import dataclasses
import errno
import glob
import gzip
import hashlib
import itertools
import json
import os
import pathlib
import queue
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import zlib
from dataclasses import dataclass


# -----------------------------------------------------------------------------
# config


def arg(default, help, positional=False, low=None, high=None, choices=None, item=str, optional=False):
    """A config field: its default, its help, and what it accepts (low <= value <= high, one of choices;
    a float must also be finite; a tuple's items are of type `item`, each held to the same rules; None if
    optional). check_fields holds every field to this; the CLI's --help shows it."""
    rule = {"low": low, "high": high, "choices": choices, "item": item, "optional": optional}
    return dataclasses.field(default=default, metadata={"help": help, "positional": positional, **rule})


def cli_flag(name):
    return "--" + name.replace("_", "-")


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@dataclass
class SAEConfig:
    """What an SAE is and what its loss weighs."""

    arch: str = arg("switch", "switch (TopK experts behind a router; --experts 1 is TopK), "
                              "or the baselines relu (L1) and gated", choices=("switch", "relu", "gated"))
    experts: int = arg(16, "N, the number of experts; 1 gives a plain TopK SAE", low=1)
    width: int = arg(24576, "M, total latents over all experts", low=1)
    k: int = arg(32, "active latents per token", low=1)
    lb_alpha: float = arg(3.0, "load-balance weight alpha; the loss adds alpha * d * L_lb (alpha * V / 30 * "
                               "L_lb with --normalize-activations, V: the scaled typical tokens' total "
                               "variance); above 1000 the balance swamps any reconstruction",
                          low=0, high=1000)
    router: str = arg("switch", "switch: each token picks its experts by router probability; expert-choice: "
                                "each expert takes the --capacity x B / N tokens of the batch it scores "
                                "highest (Zhou et al. 2022), so codes depend on the batch",
                      choices=("switch", "expert-choice"))
    capacity: float = arg(1.0, "of --router expert-choice: tokens an expert takes, in units of B / N (at N, "
                               "every expert takes every token)", low=0.01, high=1024)
    experts_per_token: int = arg(1, "e: each token to its e best experts, one TopK over the union of their "
                                    "latents, gates p_i (not renormalised over the e, so e = 1 is the "
                                    "paper's rule); e times the encoder work", low=1)
    shared_expert: bool = arg(False, "the last expert takes every token (gate 1), beside N - 1 routed ones; "
                                     "the router and the balance see those")
    gate: str = arg("softmax", "softmax: the routed latents scaled by p_i, the router's reconstruction "
                               "gradient; heaviside: by 1, so the router learns from the balance term alone",
                    choices=("softmax", "heaviside"))
    balance: str = arg("loss", "loss: the paper's balance term, weighted by --lb-alpha; aux-free: no term, a "
                               "per-expert bias on the router probabilities picks the experts and moves by "
                               "--balance-rate after each step toward equal load (Wang et al. 2024)",
                       choices=("loss", "aux-free"))
    balance_rate: float = arg(1e-3, "u, the step of --balance aux-free's bias on probabilities", low=0,
                              high=1)
    feature_scaling: bool = arg(False, "Scale SAE's feature scaling (Xu et al. 2025): each expert's encoder "
                                       "rows W_i become W_i + omega_i (W_i - their mean row), omega_i learnt "
                                       "per expert from 0. The plain reading: the low-frequency part is the "
                                       "mean row itself (the authors' code also passes it through a learnt "
                                       "d x d map, left out here); exports fold it into W_enc")
    normalize_activations: bool = arg(False, "scale the SAE's input by one constant fixed on the first "
                                             "batch, so that its typical tokens' mean norm is sqrt(d); the "
                                             "SAE still takes and returns the LM's units")
    auxk_alpha: float = arg(0.0, "AuxK weight (Gao et al. use 1/32); 0 as the paper ran", low=0)
    l1_coeff: float = arg(5.0, "L1 weight of the relu and gated baselines (sweep it for a Pareto curve)",
                          low=0)
    dead_tokens: int = arg(10_000_000, "a latent is dead after this many training tokens without firing",
                           low=1)


@dataclass
class CacheConfig:
    """Capture activations once: at sites of a causal LM on text cut into contexts, enough for a run of
    --tokens, the held-out contexts first (what a run on --acts reads, and, at one site, captures live)."""

    def __post_init__(self):  # a tuple field given one value from Python (text="a.jsonl") holds that value
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is tuple and not isinstance(value, tuple):
                one = () if value == "" else (value,)  # text="": none, as on the command line
                setattr(self, f.name, tuple(value) if isinstance(value, list) else one)

    model: str = arg("gpt2", "Hugging Face causal LM: a hub id, a local directory or a .gguf file")
    layer: tuple = arg((8,), "blocks whose sites are hooked, 0-based: one cache per layer and site, all "
                             "from one LM pass that stops after the deepest", low=0, item=int)
    site: tuple = arg(("resid",), "sites: resid (block output), attn (attention output), mlp (MLP output)",
                      choices=("resid", "attn", "mlp"))
    text: tuple = arg((), "local .txt, .jsonl or .jsonl.gz files (a 'text' field per line) "
                          "instead of --dataset")
    dataset: str = arg("Skylion007/openwebtext", "hub dataset streamed when no --text is given",
                       optional=True)
    ctx: int = arg(128, "tokens per context (see --windows), at most the model's positions", low=2)
    windows: str = arg("first", "first: each document's first ctx tokens, shorter documents skipped (the "
                                "paper's); all: every consecutive ctx-token window of each document",
                       choices=("first", "all"))
    skip_positions: int = arg(1, "leading positions of each context not trained on, spliced or ablated: "
                                 "the first is an attention sink with ~100x the usual norm (0: the paper)",
                             low=0)
    lm_batch_size: int = arg(64, "contexts per language-model forward", low=1, high=2**20)
    lm_dtype: str = arg("auto", "the LM's dtype: float32, bfloat16, or auto: bfloat16 on CUDA and on CPUs "
                                "with bf16 instructions (AMX, AVX512_BF16), float32 elsewhere",
                        choices=("auto", "float32", "bfloat16"))
    buffer_tokens: int = arg(2**20, "activations captured, then served in random order (shuffle buffer)",
                             low=1)
    tokens: int = arg(50_000_000, "training tokens (the paper: 819_200_000)", low=1)
    batch_size: int = arg(8192, "tokens per step", low=1)
    eval_tokens: int = arg(16384, "held-out tokens for evaluation, never trained on", low=1)
    seed: int = arg(0, "seed for the SAE init and the data order", low=0, high=2**32 - 1)
    device: str = arg("auto", "auto (cuda if there is one), cuda or cpu", choices=("auto", "cuda", "cpu"))
    out: str = arg("acts.bin", "the cache file; beside it FILE.tokens (its contexts) and FILE.json")


RUN_FILES = ("sae.safetensors", "config.json", "metrics.json", ".lock")  # what a run writes in its --out


# what --resume may change mid-run (besides --device and --compile, which are always this command's)
RESUMABLE = ("lr", "grad_clip", "tokens", "save_every", "log_every", "skip_ce")


@dataclass
class TrainConfig(CacheConfig, SAEConfig):
    """A training run: an SAE (fields first), its activations (next), how long and how fast, where results
    go (last)."""

    layer: int = arg(8, "block whose site is hooked, 0-based (GPT-2 small layer 8 in the paper)", low=0)
    site: str = arg("resid", "resid (block output), attn (attention output) or mlp (MLP output)",
                    choices=("resid", "attn", "mlp"))
    lr: float = arg(0.0, "learning rate; 0 means the paper's: 2e-4 / sqrt(width / 2^14) for switch, "
                         "5e-5 relu, 3e-4 gated", low=0)
    decay_start: float = arg(0.8, "fraction of training after which lr decays linearly to 0", low=0, high=1)
    grad_clip: float = arg(1.0, "gradient-norm clip; 0 turns clipping off", low=0)
    expert_parallel: bool = arg(False, "under torchrun: split the experts over the ranks "
                                       "(experts divisible by ranks)")
    compile: bool = arg(False, "torch.compile the passes over the (width, d) matrices between backward "
                               "and Adam and the decoder renormalisation, fusing each into fewer sweeps")
    acts: str = arg("", "activation cache from 'switch_sae.py cache' to train on instead of running the LM")
    skip_ce: bool = arg(False, "leave out loss-recovered evaluation (three LM passes over the held-out text)")
    out: str = arg("out", "directory for checkpoints and metrics.json")
    save_every: int = arg(10_000_000, "training tokens between checkpoints", low=1)
    resume: bool = arg(False, "continue the run saved in --out with its saved settings; of this command's "
                              f"flags only {', '.join(cli_flag(f) for f in RESUMABLE)} "
                              "may change them (recorded in config.json)")
    log_every: int = arg(10, "steps between progress updates (each one waits for the GPU)", low=1)


class UsageError(ValueError):
    """Bad input: main() prints it as one line and exits with status 2; from Python, a ValueError."""


def cause(e):
    """An exception's type and the first line of its message, for a one-line error to quote."""
    line = (str(e).strip().splitlines() or [""])[0]
    line = line if len(line) <= 200 else line[:200] + "..."  # transformers' can list hundreds of names
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def check_fields(cfg):
    """Every field of a config dataclass against its declaration (arg), before anything loads."""
    for f in dataclasses.fields(cfg):
        rule, name, values = f.metadata, cli_flag(f.name), getattr(cfg, f.name)
        kind = rule["item"] if f.type is tuple else f.type
        numbers = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(kind)  # set in code
        if f.type is not tuple and isinstance(values, tuple):  # a tuple field takes one value too
            raise UsageError(f"{name} {values!r} is a tuple: give one value")
        for value in as_tuple(values):
            if value is None and rule["optional"]:  # recorded as none: a run on local text or a cache
                continue
            if numbers and (isinstance(value, bool) != (kind is bool) or not isinstance(value, numbers)):
                raise UsageError(f"{name} {value!r} is not {KIND_NAMES[kind]}")
            if kind is float and not math.isfinite(value):
                raise UsageError(f"{name} {value}: give a finite number")
            if rule["choices"] and value not in rule["choices"]:
                raise UsageError(f"unknown {name} {value!r}: use {', '.join(rule['choices'])}")
            low, high = rule["low"], rule["high"]
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"at least {low}" if high is None else f"from {low} to {high}"
                raise UsageError(f"{name} {value} is out of range: it must be {bounds}")


KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def compiler_found():
    """torch.compile builds its kernels with a C++ compiler on PATH."""
    return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


def fields_set(cfg, given=None):
    """The fields a command set (given: from main, its flags), or else those that differ from their defaults:
    what a caller in code has set."""
    return given if given is not None else {f.name for f in dataclasses.fields(cfg)
                                            if getattr(cfg, f.name) != f.default}


ROUTER_FIELDS = ("router", "capacity", "experts_per_token", "shared_expert", "gate", "balance",
                 "balance_rate")


# the fields a kind of SAE has no use for, with the value that means "none" (None: any value is refused)
UNUSED = {"switch": {"l1_coeff": None},
          "topk": {"l1_coeff": None, "lb_alpha": None, "gate": "softmax", "balance": "loss",
                   "balance_rate": None},
          "baseline": {"experts": 1, "k": None, "lb_alpha": 0, "auxk_alpha": 0, "router": "switch",
                       "capacity": None, "experts_per_token": 1, "shared_expert": False, "gate": "softmax",
                       "balance": "loss", "balance_rate": None, "feature_scaling": False}}


EXPERT_CHOICE_FIXED = {"lb_alpha", "balance", "balance_rate"}


# Every rule between flags, stated once: (when it is broken, what to say), the first broken one refused. c
# holds a command's fields and what else is known when it is checked: given (the fields set), command, ranks,
# and for --resume and --acts the fixed flags changed, the tokens trained and the flags the cache decides. A
# rule on a field or fact c lacks does not apply to that command.
RULES = [
    # what a resumed or cached run takes from elsewhere
    (lambda c: c.fixed,
     "--resume continues the run in {out} with its own settings, and {fixed} cannot change mid-run (only "
     + ", ".join(map(cli_flag, RESUMABLE)) + " can): drop them, or start a new run in another --out"),
    (lambda c: c.cache_differ,
     "{cache_differ}: a run on --acts {acts} takes its model, layer, site, contexts and held-out tokens from "
     "the cache, and reads no text: drop them"),
    (lambda c: c.cache_replaced,
     "--acts {acts} is not the cache this run began on (its {cache_replaced} differ): restore that cache, or "
     "start a new run in another --out"),
    (lambda c: c.cache_users,
     "cache --out {out} is the cache of the runs in {cache_users}: writing it again would change their data "
     "under them; write elsewhere, or delete its .runs file"),
    # the SAE: its kind and its routing rule
    (lambda c: c.unused, "--arch {arch} has no use for {unused}{why}: drop them"),
    (lambda c: c.arch == "switch" and (c.width % c.experts or c.k > c.width // c.experts),
     "--width {width} must be a multiple of --experts {experts} and --k {k} at most the latents per expert "
     "({per_expert} = width / experts): change one of them"),
    (lambda c: c.shared_expert and c.experts < 3,
     "--shared-expert needs --experts 3 or more (one shared, the rest routed: one routed expert would leave "
     "the router nothing to choose)"),
    (lambda c: c.experts_per_token > c.routed,
     "--experts-per-token {experts_per_token} is more than the {routed} routed experts"),
    (lambda c: c.balance == "aux-free" and "lb_alpha" in c.given,
     "--lb-alpha weighs the balance term, which --balance aux-free has none of: drop it"),
    (lambda c: c.balance != "aux-free" and c.router != "expert-choice" and "balance_rate" in c.given,
     "--balance-rate is the step of --balance aux-free: add that, or drop it"),
    (lambda c: c.gate == "heaviside" and (c.balance == "aux-free" or c.lb_alpha == 0),
     "--gate heaviside with --balance aux-free or --lb-alpha 0 leaves the router nothing to learn from (no "
     "gate, no balance term): drop one"),
    (lambda c: c.auxk_alpha and (c.experts_per_token + c.shared_expert > 1 or c.router == "expert-choice"),
     "--auxk-alpha takes one expert a token (AuxK's dead latents are its expert's): drop it, or "
     "--experts-per-token and --shared-expert"),
    (lambda c: "capacity" in c.given and c.router != "expert-choice",
     "--capacity is of --router expert-choice: add that, or drop it"),
    (lambda c: c.router == "expert-choice" and EXPERT_CHOICE_FIXED & c.given,
     "--router expert-choice balances by construction: drop --lb-alpha, --balance and --balance-rate"),
    (lambda c: c.router == "expert-choice" and "experts_per_token" in c.given,
     "--router expert-choice picks tokens, not experts: drop --experts-per-token"),
    (lambda c: c.router == "expert-choice" and c.gate == "heaviside",
     "--gate heaviside with --router expert-choice leaves the router nothing to learn from: drop one"),
    (lambda c: c.compile and not compiler_found(),
     "--compile needs a C/C++ compiler on PATH (torch.compile builds its kernels with one): install g++ or "
     "drop --compile"),
    # what is captured
    (lambda c: c.text and c.dataset and "dataset" in c.given,
     "--text and --dataset both name the text: give one of them"),
    (lambda c: c.eval_tokens < c.ctx, "--eval-tokens {eval_tokens} is less than one context of --ctx {ctx}: "
                                      "evaluation needs at least one held-out context"),
    (lambda c: c.skip_positions >= c.ctx, "--skip-positions {skip_positions} must be below --ctx {ctx}"),
    (lambda c: c.tokens < c.batch_size, "--tokens {tokens} is less than one batch of --batch-size "
                                        "{batch_size}: raise --tokens"),
    (lambda c: c.command == "cache" and not (c.layer and c.site),
     "cache captures at each --layer and --site given, and was given none of one: give at least one of each"),
    (lambda c: c.command == "cache" and os.path.isdir(c.out),
     "cache --out {out} is a directory: name the cache file, e.g. --out {out}/acts.bin"),
    # the ranks
    (lambda c: c.expert_parallel and (c.arch != "switch" or c.auxk_alpha or c.feature_scaling),
     "--expert-parallel needs --arch switch, --auxk-alpha 0 and no --feature-scaling (AuxK and the mean "
     "encoder row across ranks are not supported yet)"),
    (lambda c: c.expert_parallel and (c.experts_per_token + c.shared_expert > 1 or c.router != "switch"),
     "--expert-parallel decodes on each expert's rank, so a TopK over several experts' latents cannot run "
     "there: drop --experts-per-token, --shared-expert and --router expert-choice, or use data parallel"),
    (lambda c: c.expert_parallel and c.ranks == 1 and not getattr(c, "resume", False),
     "--expert-parallel splits the experts over torchrun's ranks, and this is one process: start it with "
     "torchrun --nproc-per-node N, or drop --expert-parallel"),
    (lambda c: c.batch_size % c.ranks or (c.expert_parallel and c.experts % c.ranks),
     "--batch-size {batch_size} and, with --expert-parallel, --experts {experts} must be divisible by the "
     "{ranks} ranks"),
    (lambda c: c.ranks > 1 and c.router == "expert-choice",
     "--router expert-choice ranks the tokens of the whole batch, and each rank holds a share of it: run it "
     "in one process"),
    # the run's folder
    (lambda c: c.command == "train" and not c.resume and os.path.isfile(f"{c.out}/sae.safetensors"),
     "--out {out} holds another run's checkpoint: continue it with --resume, or pick another --out"),
    (lambda c: c.command == "train" and not c.resume
     and holds_other_json(f"{c.out}/config.json", ("arch", "resumes", "acts")),
     "--out {out} holds a config.json that no run wrote (a model's?): pick another --out"),
    (lambda c: c.command == "train" and any(os.path.isdir(os.path.join(c.out, f)) for f in RUN_FILES),
     "--out {out} holds a folder named as a file a run writes (" + ", ".join(RUN_FILES) + "): pick another "
     "--out"),
    (lambda c: c.command == "train" and not c.resume and os.path.isfile(f"{c.out}/sae_weights.safetensors"),
     "--out {out} holds an exported SAE, whose files a run's would mix with: pick another --out"),
    (lambda c: c.command == "export" and (os.path.exists(f"{c.dest}/sae.safetensors") or any(
        os.path.isdir(os.path.join(c.dest, name)) for name in ("cfg.json", "sae_weights.safetensors"))),
     "export {dest} holds a run, or folders named cfg.json or sae_weights.safetensors: export to a folder "
     "of its own"),
    (lambda c: c.tokens < c.trained, "--tokens {tokens} is fewer than the {trained} this run has trained on: "
                                     "give at least that many"),
]


def check_config(cfg, given=None, command="train", **known):
    """A command's config held to its fields' declarations, its --text files and RULES, before anything slow
    starts. given: the fields set (by default those that differ from the defaults); known: the facts the rules
    read (ranks, fixed, trained, cache_differ)."""
    check_fields(cfg)
    c = types.SimpleNamespace(**vars(cfg), given=set(fields_set(cfg, given)), command=command, **known)
    if hasattr(c, "arch"):  # an SAE's: what its messages name
        kind = "baseline" if c.arch != "switch" else "topk" if c.experts == 1 else "switch"
        c.unused = ", ".join(cli_flag(name) for name, none in UNUSED[kind].items()
                             if name in c.given and getattr(c, name) != none)
        c.why = {"baseline": " (AuxK and the router are rules of TopK experts)", "switch": "",
                 "topk": " at --experts 1 (a TopK SAE: no router to balance or gate)"}[kind]
        c.routed, c.per_expert = c.experts - c.shared_expert, c.width // c.experts
    for broken, message in RULES:
        try:
            refused = broken(c)
        except AttributeError:  # a field this command does not have, or a fact not known here
            continue
        if refused:
            raise UsageError(message.format_map(vars(c)))
    for path in () if getattr(c, "acts", "") else getattr(c, "text", ()):  # a cached run reads no text
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise UsageError(f"--text {path}: no such file, or it is empty; pass .txt, .jsonl or .jsonl.gz "
                             "files with text in them")
        if not os.path.basename(path).lower().endswith(TEXT_ENDINGS):
            raise UsageError(f"--text {path}: read as which format? Name it .txt (documents between blank "
                             "lines) or .jsonl (a {\"text\": ...} object per line), optionally .gz")
    return cfg


TEXT_ENDINGS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


def router_fields(cfg):
    """make_router's keywords, from a config."""
    return {name: getattr(cfg, name) for name in ROUTER_FIELDS}


def sae_settings(cfg, d_in):
    """make_sae's arguments for a config's SAE: what a checkpoint keeps to build it again."""
    if cfg.arch != "switch":
        return {"arch": cfg.arch, "d_in": d_in, "width": cfg.width}
    return {"arch": "switch", "d_in": d_in, "width": cfg.width, "experts": cfg.experts, "k": cfg.k,
            "feature_scaling": cfg.feature_scaling, **router_fields(cfg)}


def make_sae(arch, d_in, width, experts=1, k=32, feature_scaling=False, **routing):
    """An SAE of its kind, its settings held to RULES first; routing: make_router's keywords (Switch)."""
    unknown = ", ".join(set(routing) - set(ROUTER_FIELDS))
    if unknown:
        raise UsageError(f"make_sae has no keyword {unknown}: its routing keywords are "
                         f"{', '.join(ROUTER_FIELDS)}")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise UsageError(f"make_sae's d_in {d_in!r} is not a whole number of at least 1")
    check_config(SAEConfig(arch=arch, width=width, experts=experts, k=k, feature_scaling=feature_scaling,
                           **routing), command="make_sae")
    if arch == "switch":
        return SwitchSAE(d_in, width, experts, k, make_router(experts, **routing), feature_scaling)
    return ARCHS[arch](d_in, width)


def readable(n_bytes):
    """54.7 KiB, 1.2 GiB: a size for a message."""
    unit = min(4, int(math.log(max(n_bytes, 1), 1024)))
    return f"{n_bytes / 1024**unit:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def writable_place(path, what, file=False):
    """The nearest existing folder at or above `path` (a folder to write in, or with file=True a file to
    write or replace), once a probe shows that files can be made there."""
    if not path:
        raise UsageError(f"{what} is empty: name where to write")
    place = os.path.dirname(os.path.abspath(path)) if file else os.path.abspath(path)
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        raise UsageError(f"{what} {path}: {place} is a file, so nothing can be written there; pick another")
    try:
        os.rmdir(tempfile.mkdtemp(dir=place))
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot write in {place} ({e.strerror}); pick another") from None
    return place


def check_room(path, what, needed, file=False):
    """Refuse to start what would fill the disk: `needed` bytes must be free where `path` is written."""
    free = shutil.disk_usage(writable_place(path, what, file)).free
    if needed > free:
        raise UsageError(f"{what} {path} needs {readable(needed)} and its disk has {readable(free)} free: "
                         "make room or write elsewhere")


@contextlib.contextmanager
def disk_space_for(path, needed):
    """A disk that fills up while `path` is written becomes one line saying how much room it needed."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:  # safetensors reports the OS's error in its own type
        if getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and "os error 28" not in str(e):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise UsageError(f"the disk filled up writing {path}: it needs {readable(needed)} and "
                         f"{readable(free)} are free (files written before stay whole); make room, then "
                         "give the same command again (with --resume if it trained)") from None


def hold_lock(path, what):
    """Lock the file at path, which names its holder: a second process that would write what this one writes
    (a run's folder, a cache) is refused in one line. Returns the lock; closing it frees it."""
    import fcntl

    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise UsageError(f"{what} is being written by another process ({holder}): wait for it to end, "
                         "or pick another --out") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    return lock


def world_size():
    """The ranks torchrun started (its WORLD_SIZE), checked before any rank waits on another."""
    ranks = os.environ.get("WORLD_SIZE", "1")
    if not ranks.isdigit() or int(ranks) < 1 or int(ranks) > 1 and "RANK" not in os.environ:
        raise UsageError(f"WORLD_SIZE={ranks} is not torchrun's: start with torchrun --nproc-per-node N, or "
                         "unset WORLD_SIZE")
    return int(ranks)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu "
                         "(or install a CUDA build of torch)")
    return torch.device(name)


# -----------------------------------------------------------------------------
# capture: documents -> token contexts -> activations at one site of a causal LM -> shuffled batches


def read_documents(cfg):
    """Yield document texts: local files shuffled once by seed, or a hub dataset streamed."""
    if cfg.text:
        docs = []
        for path in cfg.text:
            name = os.path.basename(path).lower()
            opener = gzip.open if name.endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    if name.endswith((".jsonl", ".jsonl.gz")):
                        texts = [json.loads(line)["text"] for line in f if line.strip()]
                        if not all(isinstance(text, str) for text in texts):
                            raise TypeError("a \"text\" value is not a string")
                        docs += texts
                    else:  # plain text: blank lines separate documents
                        text = f.read()
                        lines = [line for line in text.splitlines() if line.strip()]
                        if lines and all(line.lstrip().startswith('{"text"') for line in lines):
                            raise ValueError("every line is a JSON object: name it .jsonl")
                        docs += [d for d in text.split("\n\n") if d.strip()]
            # bad JSON or UTF-8, no "text" or not a string, a gzip file that is corrupt or cut short
            except (ValueError, KeyError, TypeError, OSError, EOFError, zlib.error) as e:
                raise UsageError(f"--text {path}: cannot read documents ({cause(e)}); give "
                                 "UTF-8 .txt, or .jsonl(.gz) with a \"text\" string per line") from None
        if not docs:
            raise UsageError(f"--text {' '.join(cfg.text)} holds no documents: pass files with text in them")
        random.Random(cfg.seed).shuffle(docs)  # local corpora are often grouped by source
        yield from docs
        return
    if not hub_reachable():
        raise UsageError(f"cannot stream --dataset {cfg.dataset}: the Hugging Face hub is unreachable "
                         "(offline); pass local text with --text FILE.jsonl.gz")
    try:
        for row in hub_dataset(cfg.dataset).shuffle(seed=cfg.seed, buffer_size=10_000):
            yield row["text"]
    except Exception as e:
        raise UsageError(f"could not stream dataset {cfg.dataset!r} ({cause(e)}); "
                         "pass local text with --text FILE.jsonl.gz") from None


def hub_reachable():
    """False when offline mode is on or the hub's host name does not resolve. Hub lookups then fail at once
    (offline mode is switched on, so cached files still load) instead of retrying for about a minute."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            socket.getaddrinfo(urllib.parse.urlparse(constants.ENDPOINT).hostname, 443)
            return True
        except OSError:
            constants.HF_HUB_OFFLINE = True
    return False


def hub_dataset(name):
    """A hub dataset's train split, streamed. datasets >= 4 refuses datasets that ship a loading script
    (Skylion007/openwebtext, the paper's, does); the hub's own parquet export of the same rows loads."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train", streaming=True)
    except RuntimeError as e:
        if "Dataset scripts are no longer supported" not in str(e):
            raise
        return datasets.load_dataset(name, split="train", streaming=True, revision="refs/convert/parquet")


def token_contexts(cfg, tokenizer):
    """Yield 1-D tensors of cfg.ctx token ids: each document's first ctx tokens (shorter ones skipped),
    or with --windows all each of its consecutive ctx-token windows. A background thread tokenizes ahead,
    so tokenizing overlaps the LM forward."""
    first = cfg.windows == "first"

    def tokenize(texts):
        if first:
            return tokenizer(texts, truncation=True, max_length=cfg.ctx)["input_ids"]
        return tokenizer(texts, verbose=False)["input_ids"]  # whole documents, longer than the model's limit

    def tokenized_batches():
        texts = []
        for text in read_documents(cfg):
            texts.append(text[: cfg.ctx * 20] if first else text)  # ctx tokens need far fewer characters
            if len(texts) == 256:
                yield tokenize(texts)
                texts = []
        yield tokenize(texts) if texts else []

    for batch in prefetched(tokenized_batches()):
        for ids in batch:
            starts = range(0, len(ids) - cfg.ctx + 1, cfg.ctx)
            for start in starts[:1] if first else starts:
                yield torch.tensor(ids[start : start + cfg.ctx])


def held_out_contexts(cfg):
    """How many whole contexts of --eval-tokens a run holds out: the first ones of its text."""
    return max(1, cfg.eval_tokens // cfg.ctx)


def distinct_contexts(contexts, held_out_CL, dropped):
    """The training stream without the contexts whose tokens equal a held-out context's (the held-out set
    stays unseen in content, not only in position) or an earlier training context's; `dropped` counts
    both. Contexts are compared by a 64-bit hash of their tokens."""
    held_out = {hash(ctx.numpy().tobytes()) for ctx in held_out_CL}
    seen = set(held_out)
    for ctx in contexts:
        digest = hash(ctx.numpy().tobytes())
        if digest in seen:
            dropped["equal_to_held_out" if digest in held_out else "duplicate"] += 1
            continue
        seen.add(digest)
        yield ctx


def prefetched(items, depth=8):
    """Iterate over `items` produced in a background thread, up to `depth` ahead, in the same order."""
    queue_ = queue.Queue(depth)
    end = object()

    def produce():
        try:
            for item in items:
                queue_.put(item)
            queue_.put(end)
        except BaseException as e:  # handed to the consumer, which raises it
            queue_.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while (item := queue_.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def take(contexts, n, dropped=None):
    """The next n contexts as a (C, L) tensor; dropped: the repeats the stream left out, for the message."""
    rows = list(itertools.islice(contexts, n))
    if len(rows) < n:
        left_out = f" (left out as repeats: {dropped['duplicate']}, as copies of held-out contexts: " \
                   f"{dropped['equal_to_held_out']})" if dropped and any(dropped.values()) else ""
        raise UsageError(f"the text ran out: the next {n} contexts were needed and {len(rows)} were left"
                         f"{left_out}; give more text or lower --tokens / --eval-tokens (a training run that "
                         "saved a checkpoint can be finished early with --resume --tokens N)")
    return torch.stack(rows)


def model_source(model):
    """from_pretrained's arguments for --model: a hub id or directory as it is; a .gguf file as its folder
    and file name (transformers reads and dequantises GGUF with the gguf and accelerate packages)."""
    config = os.path.join(model, "config.json")
    if os.path.isdir(model) and (not os.path.isfile(config) or holds_other_json(config, ("model_type",))):
        raise UsageError(f"--model {model} holds no config.json of a model (a run's?), so it is no Hugging "
                         "Face model directory: point --model at one (or at a hub id or a .gguf file)")
    if not model.endswith(".gguf"):
        if not os.path.isdir(model):
            hub_reachable()  # when it is not, offline mode makes a model missing from the cache fail at once
        return model, {}
    if not os.path.isfile(model):
        raise UsageError(f"--model {model}: no such GGUF file")
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        raise UsageError(f"--model {model} is a GGUF file, which needs the gguf and accelerate packages: "
                         "pip install gguf accelerate") from None
    return os.path.dirname(os.path.abspath(model)), {"gguf_file": os.path.basename(model)}


def fast_bf16(device):
    """bf16 matmuls outrun fp32 on CUDA and on CPUs with bf16 instructions (Intel AMX, or AVX512_BF16 as on
    AMD Zen 4): 1.8x for SmolLM2 capture on such an EPYC. Without them bf16 is emulated and up to 4x
    slower. Detected from the CPU's flags, never assumed."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:  # not Linux: assume no
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def lm_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return getattr(torch, name)


def load_tokenizer(model):
    from transformers import AutoTokenizer

    source, gguf = model_source(model)
    return AutoTokenizer.from_pretrained(source, **gguf)


def load_lm(cfg, device):
    """A causal LM (bf16 on CUDA) and its tokenizer, from the hub, a local directory or a GGUF file."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # keeps error output to the one line that matters
    dtype = lm_dtype(cfg.lm_dtype, device)
    source, gguf = model_source(cfg.model)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its warnings and load reports would come before our one line
    try:
        tokenizer = load_tokenizer(cfg.model)
        load_dtype = torch.float32 if gguf else dtype  # GGUF dequantises to float32; cast after
        model = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype, attn_implementation="sdpa",
                                                     **gguf)
    except Exception as e:  # the hub's errors, and whatever the weight, tokenizer or GGUF parsers raise
        if not os.path.exists(cfg.model):
            raise UsageError(f"could not load model {cfg.model!r} ({cause(e)}): no network, or no such hub "
                             "id or directory; pass a local model with --model DIR or --model FILE.gguf"
                             ) from None
        raise UsageError(f"could not load model {cfg.model!r} ({cause(e)}): its files are cut short, corrupt "
                         "or of an architecture this transformers does not know") from None
    finally:
        logging.set_verbosity(verbosity)
    vocab = model.get_input_embeddings().num_embeddings
    if not 1 < len(tokenizer) <= vocab:
        raise UsageError(f"--model {cfg.model}: its tokenizer's {len(tokenizer)} tokens do not fit the "
                         f"model's {vocab} embeddings: its tokenizer files are missing or another model's")
    check_positions(model.config, cfg.ctx)
    return model.to(device, dtype).eval(), tokenizer


def check_layer(layer, n_layers):
    if not 0 <= layer < n_layers:
        raise UsageError(f"--layer {layer} is out of range: the model has {n_layers} layers, "
                         f"so use 0..{n_layers - 1}")


def check_positions(config, ctx):
    positions = getattr(config, "max_position_embeddings", None)
    if positions and ctx > positions:
        raise UsageError(f"--ctx {ctx} is longer than the model's {positions} positions: lower --ctx")


def hooked_module(model, layer, site):
    """The module whose output is the activation: block `layer` itself (resid), or its attention or MLP."""
    n_layers = model.config.num_hidden_layers
    check_layer(layer, n_layers)
    blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
    if blocks is None:
        raise UsageError(f"found no list of the model's {n_layers} blocks to hook: "
                         "this architecture is not supported yet")
    if site == "resid":
        return blocks[layer]
    names = {"attn": ("attn", "self_attn", "attention"), "mlp": ("mlp", "feed_forward")}[site]
    for name in names:
        if hasattr(blocks[layer], name):
            return getattr(blocks[layer], name)
    raise UsageError(f"--site {site}: block {layer} has no submodule named {' or '.join(names)}; "
                     "use --site resid")


class StopForward(Exception):
    """Raised by the capture hook so that layers past the hooked one never run."""


def site_output(output):
    return output[0] if isinstance(output, tuple) else output  # attention modules return (out, weights)


@torch.no_grad()
def site_activations(model, modules, tokens_CL, batch_size, skip_positions=0):
    """Activations (C * (L - skip), D) in float32 at each module's output, on the model's device, from one
    forward per batch that stops once the last of them has run: the layers past the deepest never run."""
    captured, pending = {module: [] for module in modules}, set()

    def capture_hook(mod, inputs, output):
        captured[mod].append(site_output(output)[:, skip_positions:].flatten(0, 1).float())
        pending.discard(mod)
        if not pending:
            raise StopForward

    handles = [module.register_forward_hook(capture_hook) for module in modules]
    try:
        for tokens in tokens_CL.split(batch_size):
            pending.update(modules)
            try:
                model(tokens.to(model.device), use_cache=False)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(captured[module]) for module in modules]


def lm_activations(model, module, tokens_CL, batch_size, skip_positions=0):
    """Activations (C * (L - skip), D) in float32 at `module`'s output, on the model's device."""
    return site_activations(model, [module], tokens_CL, batch_size, skip_positions)[0]


def splice_hook(patch, skip_positions):
    """A forward hook that replaces the site's output by patch(output) after the first skip_positions:
    how an SAE's reconstruction (or zeros) is spliced into the LM."""

    def hook(mod, inputs, output):
        h = site_output(output)
        new = torch.cat([h[:, :skip_positions], patch(h[:, skip_positions:])], 1)
        return (new,) + output[1:] if isinstance(output, tuple) else new

    return hook


def chunk_plan(cfg):
    """Yield (first step, steps, contexts) of each shuffle-buffer chunk of a run, the same live and cached:
    a chunk fills the buffer (the last one, what is left); a context gives ctx - skip_positions tokens."""
    steps, per_chunk = cfg.tokens // cfg.batch_size, max(1, cfg.buffer_tokens // cfg.batch_size)
    for first in range(0, steps, per_chunk):
        n_steps = min(per_chunk, steps - first)
        yield first, n_steps, chunk_contexts(cfg, n_steps)


def chunk_contexts(cfg, n_steps):
    return math.ceil(n_steps * cfg.batch_size / (cfg.ctx - cfg.skip_positions))


def contexts_needed(cfg):
    """The training contexts a whole run reads: chunk_plan's sum, without walking its (maybe 10^9) chunks."""
    steps, per_chunk = cfg.tokens // cfg.batch_size, max(1, cfg.buffer_tokens // cfg.batch_size)
    return steps // per_chunk * chunk_contexts(cfg, per_chunk) + chunk_contexts(cfg, steps % per_chunk)


def activation_batches(cfg, read_contexts, start_step, device):
    """Yield (step, x_BD) from start_step on. Each chunk's activations are served in an order fixed by
    (seed, chunk), so a resumed run sees the same batches. read_contexts(n, skip) gives the activations
    of the next n contexts, or just passes over them when skip is true."""
    B = cfg.batch_size
    for chunk, (first, n_steps, n_contexts) in enumerate(chunk_plan(cfg)):
        if first + n_steps <= start_step:  # trained on before a resume: pass over its text without the LM
            read_contexts(n_contexts, skip=True)
            continue
        acts = read_contexts(n_contexts).to(device)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + chunk)
        order = torch.randperm(len(acts), generator=generator).to(device)
        for s in range(max(0, start_step - first), n_steps):
            yield first + s, acts[order[s * B : (s + 1) * B]]


def live_reader(cfg, model, module, contexts, dropped, show=True):
    """read_contexts from the LM. The first buffer shows its capture's progress: training waits for it."""
    from tqdm import tqdm

    shown = [not show]

    def read_contexts(n, skip=False):
        tokens_CL = take(contexts, n, dropped)
        if skip:
            return None
        batches = tokens_CL.split(cfg.lm_batch_size)
        tokens = cfg.lm_batch_size * (cfg.ctx - cfg.skip_positions)
        batches = tqdm(batches, "capturing the first shuffle buffer", unit="tok", unit_scale=tokens,
                       leave=False, disable=shown[0])
        shown[0] = True
        return torch.cat([lm_activations(model, module, batch, len(batch), cfg.skip_positions)
                          for batch in batches])

    return read_contexts


# -----------------------------------------------------------------------------
# activation cache: FILE holds bf16 activations row after row, FILE.tokens the int32 contexts they came
# from, FILE.json a header; the held-out evaluation contexts come first, as in a live run


def cache_files(cfg):
    """(layer, site, path) of each cache the cache command writes: --out itself for one site, else --out
    with _L{layer}_{site} before its ending (acts.bin: acts_L5_attn.bin, ...)."""
    pairs = dict.fromkeys((layer, site) for layer in as_tuple(cfg.layer) for site in as_tuple(cfg.site))
    stem, ending = os.path.splitext(cfg.out)
    name = lambda layer, site: f"{stem}_L{layer}_{site}{ending}" if len(pairs) > 1 else cfg.out
    return [(layer, site, name(layer, site)) for layer, site in pairs]


def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def write_cache(cfg, given=None):
    """One cache per (layer, site) of cfg, all from one LM pass: the same contexts, held out alike.
    given: the fields this command sets (by default those that differ from the defaults)."""
    from tqdm import tqdm

    caches = cache_files(cfg)
    users = [user for *_, path in caches for user in cache_users(path)]
    check_config(cfg, given, command="cache", cache_users=", ".join(users))
    device = pick_device(cfg.device)
    writable_place(cfg.out, "cache --out", file=True)
    for *_, path in caches:  # a cache is written again in place; any other file or folder stays
        header_path = path + ".json"
        header_ok = os.path.isfile(header_path) and not holds_other_json(header_path, ("rows", "contexts"))
        for part in (path, path + ".json", path + ".tokens"):
            if os.path.exists(part) and not (os.path.isfile(part) and header_ok):
                raise UsageError(f"cache --out {cfg.out}: {part} exists and is no cache's, so it is not "
                                 "written over: pick another --out")
    model, tokenizer = load_lm(cfg, device)
    modules = [hooked_module(model, layer, site) for layer, site, _ in caches]
    n_eval, d = held_out_contexts(cfg), model.config.hidden_size
    n_total = n_eval + contexts_needed(cfg)
    rows = n_total * (cfg.ctx - cfg.skip_positions)
    new = f".tmp{os.getpid()}"  # the new cache is written beside the old, which stays whole until it is done
    parts = [path + new + end for *_, path in caches for end in ("", ".tokens")]
    needed = len(caches) * sum(cache_sizes(rows, d, n_total, cfg.ctx))  # beside the old, until it is whole
    check_room(cfg.out, "cache --out", needed, file=True)  # before the LM runs
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    locks, on_sigterm = [], signal.getsignal(signal.SIGTERM)
    try:  # the locks go with this command, whatever ends it
        for *_, path in caches:  # one a cache, so no other command writes it meanwhile
            locks.append(hold_lock(path + ".lock", f"cache --out {path}"))
            for leftover in glob.glob(glob.escape(path) + ".tmp[0-9]*"):  # of a command killed mid-write
                os.remove(leftover)
        signal.signal(signal.SIGTERM, interrupt)  # a scheduler's stop, as Ctrl-C: the new files are removed
        contexts = token_contexts(cfg, tokenizer)
        held_out_CL = take(contexts, n_eval)
        dropped = {"equal_to_held_out": 0, "duplicate": 0}
        contexts = itertools.chain(held_out_CL, distinct_contexts(contexts, held_out_CL, dropped))
        text = {"text": list(cfg.text), "dataset": None if cfg.text else cfg.dataset}
        headers = [{"format": CACHE_FORMAT, **text, "model": cfg.model, "layer": layer, "site": site,
                    "ctx": cfg.ctx, "skip_positions": cfg.skip_positions, "d": d, "dtype": "bfloat16",
                    "eval_contexts": n_eval, "contexts": n_total, "rows": rows, "seed": cfg.seed,
                    "windows": cfg.windows,
                    "lm_dtype": str(model.dtype), "complete": False} for layer, site, _ in caches]
        try:
            with disk_space_for(cfg.out, needed), contextlib.ExitStack() as files:
                opened = [files.enter_context(open(part, "wb")) for part in parts]
                outputs = list(zip(opened[::2], opened[1::2]))  # (activations, contexts) of each cache
                for first in tqdm(range(0, n_total, cfg.lm_batch_size), desc="cache", unit="ctx",
                                  unit_scale=cfg.lm_batch_size):
                    tokens_CL = take(contexts, min(cfg.lm_batch_size, n_total - first), dropped)
                    tokens = tokens_CL.to(torch.int32).numpy().tobytes()
                    acts = site_activations(model, modules, tokens_CL, cfg.lm_batch_size, cfg.skip_positions)
                    for acts_BD, (acts_file, tokens_file) in zip(acts, outputs):
                        acts_file.write(acts_BD.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
                        tokens_file.write(tokens)
        except (UsageError, OSError, KeyboardInterrupt) as e:  # out of text or disk, Ctrl-C: of no use
            for part in parts:
                with contextlib.suppress(OSError):
                    os.remove(part)
            if isinstance(e, KeyboardInterrupt):
                raise
            why = e if isinstance(e, UsageError) else f"cache --out {cfg.out}: {cause(e)}"
            raise UsageError(f"{why} (the unfinished cache files were removed)") from None
        for (layer, site, path), header in zip(caches, headers):
            header = {**header, **cache_digests(path + new, header), "complete": True,
                      "dropped_contexts": dropped}
            os.replace(path + new, path)
            os.replace(path + new + ".tokens", path + ".tokens")
            write_json(path + ".json", header)
            print(f"wrote {rows} activations of {cfg.model} layer {layer} {site} to {path}")
        print(f"{n_eval} held-out contexts first; left out: {dropped['equal_to_held_out']} training contexts "
              f"equal to a held-out one, {dropped['duplicate']} repeats")
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        for lock in locks:
            os.remove(lock.name)
            lock.close()


def holds_other_json(path, fields):
    """Whether the file at path is not a JSON object with these fields: another tool's (a model's
    config.json), which neither a run nor the cache command writes over. No file there: False."""
    try:
        content = json.load(open(path))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return True
    return not (isinstance(content, dict) and set(fields) <= set(content))


def cache_users(path, all_listed=False):
    """The run folders that train on the cache at path, as path.runs lists them: those that still hold a
    checkpoint, or with all_listed every one."""
    listed = open(path + ".runs").read().split("\n") if os.path.isfile(path + ".runs") else []
    return [run for run in listed if run and (all_listed or os.path.isfile(f"{run}/sae.safetensors"))]


def cache_sizes(rows, d, contexts, ctx):
    """The bytes of a cache's activations (bf16 rows of d) and of its contexts (int32 tokens)."""
    return rows * d * 2, contexts * ctx * 4


CACHE_FORMAT = 2  # files of other formats are refused, not read by code kept for them


CACHE_HEADER = {"model": (str,), "layer": (int,), "site": (str,), "ctx": (int,), "skip_positions": (int,),
                "d": (int,), "eval_contexts": (int,), "contexts": (int,), "rows": (int,), "windows": (str,),
                "text": (list,), "dataset": (str, type(None)), "dropped_contexts": (dict,)}


DIGESTS = ("header_sha256", "held_out_sha256", "tokens_sha256")


def cache_digests(path, header):
    """sha256 of a cache's settings, of its contexts and of its held-out rows: they tie its three files
    together, so an edited header or a .tokens or .bin file of another cache is found out (hashing the
    held-out rows alone keeps it fast)."""
    held_out_bytes = header["eval_contexts"] * (header["ctx"] - header["skip_positions"]) * header["d"] * 2
    settings = {key: value for key, value in header.items() if key not in ("complete", "dropped_contexts")
                and key not in DIGESTS}
    with open(path, "rb") as acts_file, open(path + ".tokens", "rb") as tokens_file:
        return {"header_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
                "held_out_sha256": hashlib.sha256(acts_file.read(held_out_bytes)).hexdigest(),
                "tokens_sha256": hashlib.sha256(tokens_file.read()).hexdigest()}


def open_cache(path):
    """Header, activation rows (memory-mapped) and contexts of a cache. Refused in one line: a cache left
    incomplete; a header cut, edited or of the wrong types; a part missing, cut, or from another cache;
    held-out rows that are not finite."""
    import numpy as np

    again = (f"write it again with 'switch_sae.py cache --out {path}' and the --model, --text, --layer and "
             "--site it was made from")
    if not os.path.isfile(path + ".json"):
        named = next((path[: -len(end)] for end in (".json", ".tokens") if path.endswith(end)), None)
        if named and os.path.isfile(named + ".json"):
            raise UsageError(f"--acts {path} is a part of the cache {named}: name the cache, --acts {named}")
        if os.path.isdir(path):
            raise UsageError(f"--acts {path} is a directory: name the cache file in it, e.g. --acts "
                             f"{os.path.join(path, 'acts.bin')} (the --out of 'switch_sae.py cache')")
        if os.path.exists(path):
            raise UsageError(f"--acts {path} is no cache (it has no header {path}.json): name the --out of a "
                             "'switch_sae.py cache' command")
        raise UsageError(f"--acts {path}: no cache there (no {path}.json); write one with "
                         f"'switch_sae.py cache --out {path}'")
    try:
        header = json.load(open(path + ".json"))
        fmt = header.get("format")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--acts {path}: its header {path}.json is unreadable ({cause(e)}); "
                         f"{again}") from None
    if fmt != CACHE_FORMAT:
        raise UsageError(f"--acts {path} is of cache format {fmt or 'none recorded (an earlier one)'}, and "
                         f"this code reads format {CACHE_FORMAT} only; {again}")
    if header.get("complete") is not True:
        raise UsageError(f"--acts {path} is incomplete (its cache run was stopped): {again}")
    wrong = [key for key, kinds in {**CACHE_HEADER, **dict.fromkeys(DIGESTS, (str,))}.items()
             if type(header.get(key)) not in kinds]
    if wrong or header.get("dtype") != "bfloat16":
        raise UsageError(f"--acts {path}: its header has {', '.join(wrong) or 'dtype'} of the wrong type; "
                         f"{again}")
    n_eval, per_context = header["eval_contexts"], header["ctx"] - header["skip_positions"]
    sizes = dict(zip((path, path + ".tokens"), cache_sizes(header["rows"], header["d"], header["contexts"],
                                                            header["ctx"])))
    if not (0 < n_eval <= header["contexts"] and header["rows"] == header["contexts"] * per_context
            and all(os.path.isfile(p) and os.path.getsize(p) == size for p, size in sizes.items())):
        raise UsageError(f"--acts {path}: its files are missing, cut short, or do not match its header; "
                         f"{again}")
    if any(header[key] != value for key, value in cache_digests(path, header).items()):
        raise UsageError(f"--acts {path}: its header was edited, or its .bin or .tokens file belongs to "
                         f"another cache; {again}")
    rows = np.memmap(path, dtype=np.int16, mode="r", shape=(header["rows"], header["d"]))
    if not torch.from_numpy(np.array(rows[: n_eval * per_context])).view(torch.bfloat16).isfinite().all():
        raise UsageError(f"--acts {path}: its held-out activations are not all finite (NaN or inf); {again}")
    tokens = np.fromfile(path + ".tokens", dtype=np.int32).reshape(header["contexts"], header["ctx"])
    return header, rows, torch.from_numpy(tokens).long()


def cache_reader(rows, header, context_ids):
    """read_contexts over a cache: the contexts numbered context_ids, in that order."""
    import numpy as np

    rows_CLD = rows.reshape(header["contexts"], header["ctx"] - header["skip_positions"], header["d"])
    context_ids, position = np.asarray(context_ids), [0]

    def read_contexts(n, skip=False):
        ids = context_ids[position[0] : position[0] + n]
        position[0] += n
        if skip:
            return None
        rows_read = rows_CLD[ids].reshape(-1, header["d"])  # contiguous runs of ids read as fast as slices
        return torch.from_numpy(rows_read).view(torch.bfloat16).float()

    return read_contexts


# -----------------------------------------------------------------------------
# training runs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_reader(read_contexts, device, seconds):
    """read_contexts, adding its wall time to seconds["activations"]; the device is synchronised around it,
    so SAE work still queued is not counted as capture."""

    def read(n, skip=False):
        sync(device)
        start = time.perf_counter()
        acts = read_contexts(n, skip)
        sync(device)
        seconds["activations"] += time.perf_counter() - start
        return acts

    return read


class Source(NamedTuple):
    """Where a run's activations come from."""

    d: int
    read_contexts: object  # read_contexts(n, skip=False): the next n contexts' activations (C * L, D)
    eval_tokens_CL: torch.Tensor  # the held-out contexts
    eval_x: torch.Tensor | None  # their activations, when read from a cache
    model: object  # the LM (None: a cached run that skips loss recovered)
    module: object  # its hooked module
    digests: dict | None = None  # what --resume holds the data to: the cache's, or the held-out tokens'


CACHE_SETTINGS = ("model", "layer", "site", "ctx", "skip_positions", "windows")  # and its text


def cached_config(cfg, given):
    """A run on --acts takes the cache's settings: the config with them, its open cache, and the flags given
    that disagree with it (for RULES)."""
    cache = open_cache(cfg.acts)
    header = cache[0]
    cached = dataclasses.replace(cfg, **{key: header[key] for key in CACHE_SETTINGS},
                                 text=tuple(header["text"]), dataset=header["dataset"])
    differ = [cli_flag(key) for key in CACHE_SETTINGS if key in given and getattr(cfg, key) != header[key]]
    differ += [cli_flag(key) for key in ("text", "dataset") if key in given]
    if "eval_tokens" in given and held_out_contexts(cached) != header["eval_contexts"]:
        differ.append("--eval-tokens")
    return cached, cache, ", ".join(differ)


def activation_source(cfg, cache, device, comms, dropped):
    """Live, each rank reads its own share of the text; from a cache, every rank reads the same global stream.
    Training contexts equal to a held-out one, or to an earlier one, are left out and counted in
    `dropped` (the cache did so when written)."""
    if cfg.acts:  # the LM is needed only for loss-recovered evaluation
        header, rows, cache_tokens = cache
        n_eval = header["eval_contexts"]
        dropped.update(header["dropped_contexts"])
        if header["contexts"] - n_eval < contexts_needed(cfg):  # known now, not once the run runs out
            raise UsageError(f"--acts {cfg.acts} holds {header['contexts'] - n_eval} distinct training "
                             f"contexts and this run needs {contexts_needed(cfg)}: write the cache with this "
                             "run's --tokens, --batch-size and --buffer-tokens, or lower --tokens")
        eval_x = cache_reader(rows, header, range(n_eval))(n_eval)
        evaluating_ce = comms.rank == 0 and not cfg.skip_ce
        model, module = lm_for_evaluation(cfg, device) if evaluating_ce else (None, None)
        read_contexts = cache_reader(rows, header, range(n_eval, header["contexts"]))
        digests = {key: header[key] for key in DIGESTS}
        return Source(header["d"], read_contexts, cache_tokens[:n_eval], eval_x, model, module, digests)
    model, tokenizer = load_lm(cfg, device)
    module = hooked_module(model, cfg.layer, cfg.site)
    contexts = token_contexts(cfg, tokenizer)
    eval_tokens_CL = take(contexts, held_out_contexts(cfg))  # held out: read first, never trained on
    contexts = distinct_contexts(contexts, eval_tokens_CL, dropped)  # every rank filters the whole stream
    contexts = itertools.islice(contexts, comms.rank, None, comms.ranks)
    read_contexts = live_reader(cfg, model, module, contexts, dropped, show=comms.rank == 0)
    digests = {"held_out_tokens_sha256": hashlib.sha256(eval_tokens_CL.numpy().tobytes()).hexdigest()}
    return Source(model.config.hidden_size, read_contexts, eval_tokens_CL, None, model, module, digests)


def lm_for_evaluation(cfg, device):
    """The cached run's LM for loss-recovered evaluation, or (None, None) with a note saying why not."""
    try:
        model, _ = load_lm(cfg, device)
    except UsageError as e:
        print(f"note: loss recovered needs the model and is left out: {e}")
        return None, None
    return model, hooked_module(model, cfg.layer, cfg.site)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, the first SIGINT or SIGTERM sets the yielded flag to its number, so the run saves
    and stops at its next log step; a second one interrupts at once. The previous handlers come back after
    (a notebook that trains several SAEs keeps its own interrupt)."""
    flag = torch.zeros(1)

    def handler(signum, frame):
        if flag.item():
            raise KeyboardInterrupt(signum)
        flag.fill_(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_sae(cfg, d, comms):
    """The run's SAE, seeded right here, so loading the LM (or not, from a cache) cannot change its init."""
    torch.manual_seed(cfg.seed)
    if cfg.expert_parallel and comms.ranks > 1:
        router = make_router(cfg.experts, **router_fields(cfg))
        return ExpertParallelSwitchSAE(d, cfg.width, cfg.experts, cfg.k, comms, router)
    return make_sae(**sae_settings(cfg, d))


def free_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux: unknown
        return math.inf


def check_resources(cfg, d, device, saes=1, shards=1, out=None):
    """Refuse SAEs that cannot fit, before they are built: in memory, the two (M, D) matrices (this rank's
    1/shards of them) with their gradients and Adam's two moments, and a step's (B, m) encoder
    pre-activations twice over, in float32; with out, on its disk, a checkpoint (weights and Adam's two
    moments, the old file and the new side by side)."""
    m = cfg.width // cfg.experts if cfg.arch == "switch" else cfg.width
    needed = saes * 4 * (8 * cfg.width // shards * d + 2 * cfg.batch_size * m)
    free = free_memory(device)
    if needed > free:
        raise UsageError(f"training {cfg.width} latents of d = {d} needs about {readable(needed)} and "
                         f"{device} has {readable(free)} free: lower --width or --batch-size")
    if out is not None:
        checkpoint = 3 * 4 * (2 * cfg.width * d + cfg.width + (cfg.experts + 2) * d) + 8 * cfg.width
        saved = os.path.join(out, "sae.safetensors")
        old = os.path.getsize(saved) if os.path.isfile(saved) else 0
        check_room(out, "--out", 2 * checkpoint - old)


def refused_together(check, comms, device):
    """check() on every rank, its refusal raised on every rank if any refuses: a rank stopping alone would
    leave the others waiting in a collective. Returns what check returned."""
    try:
        result, refused = check(), None
    except UsageError as e:
        result, refused = None, e
    if comms.all_reduce(torch.tensor([float(refused is not None)], device=device)).item():
        raise refused or UsageError("another rank refused the run (its message is above)")
    return result


class Diverged(UsageError):
    """The loss or the weights became NaN or infinite: the learning rate was too high."""


def logged_values(sae, parts, stop, x_absmax, saving, comms=SINGLE_PROCESS):
    """What a log step reads, summed over ranks in one collective: the loss, its reconstruction part, the
    stop flag, the largest |activation| so far and, at a save, whether the weights are all finite (a step
    can make them NaN before the loss shows it)."""
    bad = torch.zeros((), device=sae.device)
    if saving:
        bad = torch.stack([(~t.isfinite()).any() for t in sae.state_dict().values()]).sum()  # router's too
    logged = torch.stack([parts["loss"], parts["recon"], stop.to(sae.device)[0], x_absmax, bad.float()])
    loss, recon, stopping, largest, bad = comms.all_reduce(logged).tolist()
    return loss, recon, stopping, largest, bad == 0


def diverged(cfg, step, saved_step, loss, x_absmax, weights_finite, x_typical):
    """The error for a run gone non-finite by `step`: why, and what is true of its checkpoint. x_absmax: the
    largest |input| so far (summed over ranks: a bound on it); x_typical: the first batch's median norm."""
    lr = base_lr(cfg)
    kept = f"the checkpoint of step {saved_step} in {cfg.out} is intact" if saved_step else \
        "no checkpoint was saved before it"
    if not math.isfinite(x_absmax) or x_absmax > 1e4 * x_typical:  # massive activations reach ~100x
        source = f"the cache {cfg.acts}" if cfg.acts else "the LM"
        what = "hold NaN or inf" if not math.isfinite(x_absmax) else \
            f"reach {x_absmax:.3g}, {x_absmax / x_typical:.2g} times the first batch's median norm"
        return UsageError(f"the activations by step {step} {what}, from {source}: bad data, not a learning "
                          f"rate too high; {kept}")
    coefficients = ARCHS[cfg.arch].loss_coefficients(cfg, 0, 1)
    weights = [cli_flag(name) for name, weight in coefficients.items() if weight]
    lower = f" (or a lower {' or '.join(weights)}, if set high)" if weights else ""
    fix = f"start again with a lower --lr than {lr:.2g}{lower}" if not saved_step else \
        f"continue it at a lower learning rate{lower} with --resume --out {cfg.out} --lr {lr / 3:.2g}"
    what = f"the loss became {loss}" if weights_finite else "the weights became NaN or infinite"
    return Diverged(f"{what} by step {step} (the largest activation so far: {x_absmax:.3g}); {kept}: {fix}")


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal (its one argument) once its checkpoint was saved: main() exits with 128 +
    the signal's number."""


def resumed_config(cfg, given):
    """The run saved in cfg.out, with this command's --device and --compile and the RESUMABLE fields it
    gives. Returns it, the run's history of such changes with this command's ({field: [saved, new]}), and
    what RULES reads: the fixed flags given another value, the tokens trained, the cache it began on."""
    saved = dataclasses.replace(load_config(cfg.out), device=cfg.device, compile=cfg.compile)
    changed = {name: [getattr(saved, name), getattr(cfg, name)] for name in sorted(given)
               if name not in ("resume", "out", "device", "compile")
               and getattr(saved, name) != getattr(cfg, name)}
    fixed = ", ".join(cli_flag(name) for name in changed if name not in RESUMABLE)
    changed = {name: change for name, change in changed.items() if name in RESUMABLE}
    path = os.path.join(cfg.out, "sae.safetensors")
    if not os.path.isfile(path):
        raise UsageError(f"--resume: {cfg.out} has no checkpoint yet; drop --resume to start the run afresh")
    info = read_checkpoint(path, weights=False)[0]
    if info["data"] is None:  # what it trained on cannot be checked
        raise UsageError(f"--resume: {path} records no digests of its data (it predates them): start a new "
                         "run in another --out")
    history = json.load(open(os.path.join(cfg.out, "config.json"))).get("resumes", [])
    latest = {key: new for r in history for key, (_, new) in r["changed"].items()}  # some may not have saved
    as_json = lambda cfg: json.loads(json.dumps(dataclasses.asdict(cfg)))
    recorded = {**as_json(TrainConfig()), **info["config"]}  # a field added since the run began: its default
    edited = [cli_flag(key) for key, value in as_json(saved).items()
              if key not in ("resume", "out", "device", "compile") and recorded[key] != value
              and (key not in RESUMABLE or latest.get(key) != value)]
    if edited:  # the checkpoint is the truth: its settings made the weights
        raise UsageError(f"--resume: {cfg.out}/config.json disagrees with the run's checkpoint on "
                         f"{', '.join(edited)} (edited, or another run's): restore it, or start a new run in "
                         "another --out")
    trained = info["step"] * saved.batch_size
    resumed = dataclasses.replace(saved, **{name: new for name, (_, new) in changed.items()})
    return resumed, history, changed, {"fixed": fixed, "trained": trained, "began_on": info["data"]}


def rank_share(cfg, ranks):
    """What one of `ranks` ranks captures live: its share of each batch, buffer and the tokens."""
    return dataclasses.replace(cfg, tokens=cfg.tokens // ranks, batch_size=cfg.batch_size // ranks,
                               buffer_tokens=cfg.buffer_tokens // ranks)


class Run(NamedTuple):
    """A run once started: its settings, ranks, activations, SAE, optimizer and dead-latent clock, the step
    it starts from, and the training contexts left out (repeats)."""

    cfg: TrainConfig
    comms: object
    source: Source
    sae: nn.Module
    opt: torch.optim.Optimizer
    clock_M: torch.Tensor
    start: int
    dropped: dict
    lock: object  # the run folder's lock (rank 0), held until the run ends


def start_run(cfg, given):
    """Every check, then the activation source, the SAE, its optimizer and dead-latent clock (restored on
    --resume) and config.json."""
    given, history, changed, known, cache = fields_set(cfg, given), [], {}, {}, None
    check_fields(cfg)
    if cfg.resume:  # the run's own settings; where and how fast to run it are this command's
        cfg, history, changed, known = resumed_config(cfg, given)
        given = set(changed) | given & {"resume", "out", "device", "compile"}  # what this command changes
    began_on = known.pop("began_on", None)
    if cfg.acts:
        cfg, cache, known["cache_differ"] = cached_config(cfg, given)
        header = cache[0]
        known["cache_replaced"] = ", ".join(key for key in DIGESTS
                                            if began_on and began_on[key] != header[key])
    check_config(cfg, given, ranks=world_size(), **known)  # before torchrun's group starts: all ranks alike
    # what config.json records: the learning rate used, and no dataset where the run read none
    cfg = dataclasses.replace(cfg, lr=base_lr(cfg), dataset=None if cfg.text else cfg.dataset)
    writable_place(cfg.out, "--out")
    device, comms = start_distributed(pick_device(cfg.device))
    dropped = {"equal_to_held_out": 0, "duplicate": 0}
    source = activation_source(cfg, cache, device, comms, dropped)
    if began_on and not cfg.acts and began_on != source.digests:  # on every rank alike
        raise UsageError(f"--resume: the held-out contexts of {' '.join(cfg.text) or cfg.dataset} are not "
                         "those this run began on (its text or tokenizer changed): restore them, or start a "
                         "new run in another --out")
    share = rank_share(cfg, comms.ranks)
    shards = comms.ranks if cfg.expert_parallel else 1
    out = cfg.out if comms.rank == 0 else None  # the only rank that writes
    refused_together(lambda: check_resources(share, source.d, device, shards=shards, out=out), comms, device)
    sae = build_sae(cfg, source.d, comms).to(device)
    opt = make_optimizer(sae)
    clock_M = torch.zeros(len(sae.W_dec), dtype=torch.long, device=device)
    steps = cfg.tokens // cfg.batch_size
    start = load_checkpoint(cfg.out, sae, opt, clock_M, comms) if cfg.resume else 0

    def hold():  # the folder, and the rules again under its lock (another process may have written there)
        os.makedirs(cfg.out, exist_ok=True)
        lock = hold_lock(os.path.join(cfg.out, ".lock"), f"--out {cfg.out}")
        check_config(cfg, given, ranks=comms.ranks, **known)
        for leftover in pathlib.Path(cfg.out).glob("*.tmp[0-9]*"):  # of a save killed mid-write
            leftover.unlink()
        with contextlib.suppress(FileNotFoundError):  # of the run before a restart or an extension
            os.remove(os.path.join(cfg.out, "metrics.json"))
        if cfg.acts and os.path.abspath(cfg.out) not in cache_users(cfg.acts, all_listed=True):
            try:  # so that the cache command will not replace it
                with open(cfg.acts + ".runs", "a") as runs:
                    runs.write(os.path.abspath(cfg.out) + "\n")
            except OSError as e:  # in a folder no one can write, no command can replace the cache either
                if os.access(os.path.dirname(os.path.abspath(cfg.acts)), os.W_OK):
                    raise UsageError(f"--acts {cfg.acts}: this run cannot list itself in {cfg.acts}.runs "
                                     f"({cause(e)}), which keeps the cache from being replaced under it: "
                                     "make that file writable") from None
        return lock

    lock = refused_together(hold if comms.rank == 0 else lambda: None, comms, device)
    if comms.rank == 0:
        history += [{"step": start, "changed": changed}] if changed else []
        write_json(os.path.join(cfg.out, "config.json"), {**dataclasses.asdict(cfg), "resumes": history})
        flops = sae.flops_per_token(cfg.batch_size)
        print(f"{cfg.model} layer {cfg.layer} {cfg.site}: d={source.d}, {sae.summary()}, {steps} steps of "
              f"{cfg.batch_size} tokens on {comms.ranks} rank(s), {flops['total'] / 1e6:.2f} MFLOP/token "
              f"({flops['paper_encoder_only'] / 1e6:.2f} by the paper's count)")
        if cfg.tokens < 819_200_000:
            print("the paper trained on 819.2M tokens: add --tokens 819200000")
        feed = f"reading {cfg.acts}" if cfg.acts else f"capturing {cfg.buffer_tokens:,} tokens a buffer by LM"
        print(f"training: {feed}; the steps' bar starts once the first buffer is filled")
    return Run(cfg, comms, source, sae, opt, clock_M, start, dropped, lock)


def train_loop(run):
    """The steps from run.start on: a checkpoint every save_every tokens and at the end, a check for
    divergence at each log step, a checkpoint and Stopped on a signal. Returns the loop's counts."""
    from tqdm import tqdm

    cfg, comms, sae, opt, clock_M, start = run.cfg, run.comms, run.sae, run.opt, run.clock_M, run.start
    device, ranks, steps = sae.device, comms.ranks, cfg.tokens // cfg.batch_size
    flops, save_every = sae.flops_per_token(cfg.batch_size), max(1, cfg.save_every // cfg.batch_size)
    seconds, started, auxk_steps, loss_curve = {"activations": 0.0}, time.perf_counter(), 0, []
    saved_step, x_absmax, x_typical = start, torch.zeros((), device=device), None  # NaN once an input was
    read_contexts = timed_reader(run.source.read_contexts, device, seconds)
    bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, disable=comms.rank > 0, delay=1e9)
    # live, each rank captures its own share of each batch; from a cache it reads the global batch
    batches = activation_batches(cfg if cfg.acts else rank_share(cfg, ranks), read_contexts, start, device)
    with stop_on_signals() as stop, bar:  # the bar ends its line on any exit, an error's too
        for step, x_BD in batches:
            x_BD = x_BD.chunk(ranks)[comms.rank] if cfg.acts else x_BD  # from a cache, keep this rank's share
            if step == 0:  # from the whole first batch, the same on every rank
                first_BD = comms.gather_rows(x_BD)
                if cfg.normalize_activations:
                    sae.normalize_inputs_(first_BD)
                sae.init_biases_(first_BD)
            dead_M = clock_M > cfg.dead_tokens if cfg.auxk_alpha else None
            coefs = type(sae).loss_coefficients(cfg, step, steps)
            lr = lr_at(cfg, step, steps)
            out, parts = train_step(sae, opt, x_BD, lr, coefs, cfg.grad_clip, comms, dead_M, cfg.compile,
                                    lr / base_lr(cfg))
            tick_dead_clock(clock_M, sae, out, comms)
            x_absmax = torch.maximum(x_absmax, x_BD.abs().amax())
            if x_typical is None:  # one sync, at the first step
                x_typical = x_BD.float().norm(dim=1).median().item()
            auxk_steps += out.aux_idx is not None  # dead latents, so AuxK ran
            if step == start:  # shown, and timed, from here: the capture before had its own bar
                bar.delay = 0
                bar.unpause()
            bar.update(1)
            saving = (step + 1) % save_every == 0 or step + 1 == steps
            if not (saving or (step + 1) % cfg.log_every == 0):
                continue
            # a log step: all ranks check together, in one collective
            logged = logged_values(sae, parts, stop, x_absmax, saving, comms)
            loss, recon, stopping, largest, weights_ok = logged
            loss_curve.append([step + 1, recon / ranks])
            if not (math.isfinite(loss) and math.isfinite(largest) and weights_ok):  # before any save
                raise diverged(cfg, step + 1, saved_step, loss, largest, weights_ok, x_typical)
            bar.set_postfix(mse=f"{recon / ranks:.1f}", fve=f"{parts['fve'].item():.3f}",
                            tok_s=f"{(bar.format_dict['rate'] or 0) * cfg.batch_size:.0f}",
                            pflop=f"{flops['total'] * (step + 1) * cfg.batch_size / 1e15:.4f}")
            if saving or stopping:
                save_checkpoint(cfg.out, sae, cfg, step + 1, opt, clock_M, comms, run.source.digests)
                saved_step = step + 1
            if stopping:
                bar.close()  # before the message
                if comms.rank == 0:
                    print(f"stopped by a signal after step {step + 1}: checkpoint saved in {cfg.out}; "
                          f"continue with --resume --out {cfg.out}")
                raise Stopped(int(stop.item()) or signal.SIGTERM)  # the signal came to another rank
    sync(device)
    seconds["loop"] = time.perf_counter() - started
    return {"auxk_steps": auxk_steps, "loss_curve": loss_curve, "seconds": seconds}


def finish_run(run, counts):
    """Evaluate on the held-out contexts and write metrics.json (rank 0; other ranks return None)."""
    cfg, comms, sae, dropped = run.cfg, run.comms, run.sae, run.dropped
    eval_tokens_CL, eval_x, model, module = (getattr(run.source, name) for name in
                                             ("eval_tokens_CL", "eval_x", "model", "module"))
    clock_M = comms.gather_rows(run.clock_M) if is_sharded(sae.W_dec) else run.clock_M
    if comms.rank > 0:
        return None
    whole = load_sae(cfg.out, sae.device) if is_sharded(sae.W_dec) else sae
    print(f"evaluating on {len(eval_tokens_CL)} held-out contexts"
          + ("" if cfg.skip_ce or model is None else " (then three LM passes for loss recovered and KL)"))
    if eval_x is None:
        eval_x = lm_activations(model, module, eval_tokens_CL, cfg.lm_batch_size, cfg.skip_positions)
    metrics = evaluate(whole, cfg, eval_x, None if cfg.skip_ce else model, module, eval_tokens_CL)
    steps, seconds = cfg.tokens // cfg.batch_size, counts["seconds"]
    terms = sae.flops_per_token(cfg.batch_size)
    metrics.update(dead_fraction_train=(clock_M > cfg.dead_tokens).float().mean().item(),
                   train_tokens=steps * cfg.batch_size, flops_per_token=terms["total"],
                   train_flops=training_flops(sae, cfg.batch_size, steps, counts["auxk_steps"]),
                   auxk_steps=counts["auxk_steps"],
                   loss_curve=counts["loss_curve"],  # [step, reconstruction loss] each log step, this process
                   paper_flops_per_token=terms["paper_encoder_only"],
                   input_scale=whole.input_scale.item(),  # 1 unless --normalize-activations
                   dropped_contexts=dropped,  # live: among the contexts read; cached: in the whole cache
                   seconds_activations=seconds["activations"],  # LM forwards (or cache reads), this process
                   seconds_sae=seconds["loop"] - seconds["activations"])  # SAE steps, logging, checkpoints
    if isinstance(whole, SwitchSAE):
        metrics["lb_scale"] = whole.lb_scale.item()  # what alpha multiplies: d, or V / 30 when normalized
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    print_table(metrics)
    return metrics


def train(cfg, given=None):
    """Train one SAE, or with cfg.resume continue the run in cfg.out; returns its metrics on rank 0.
    given: the fields this command sets, which --resume holds against the run's own (by default those
    that differ from TrainConfig's defaults). Every check runs before anything is written."""
    run = start_run(cfg, given)
    try:
        return finish_run(run, train_loop(run))
    finally:
        if run.lock:
            run.lock.close()


# -----------------------------------------------------------------------------
# evaluation


def next_token_ce(logits_CLV, tokens_CL):
    return F.cross_entropy(logits_CLV[:, :-1].flatten(0, 1), tokens_CL[:, 1:].flatten())


@torch.no_grad()
def lm_losses(model, module, tokens_CL, batch_size, patches, skip_positions=0):
    """Mean next-token cross-entropy of the clean LM (ce_clean) and with each patch of `patches` (a dict
    name: patch) applied to the site's output after the first skip_positions (ce_NAME), and each patch's
    KL divergence from the clean next-token distribution (kl_NAME). Both average over all positions, as the
    paper's CE does, so the unpatched first skip_positions count with KL 0."""
    sums = dict.fromkeys(["ce_clean"] + [f"{kind}_{name}" for name in patches for kind in ("ce", "kl")], 0.0)
    for tokens in tokens_CL.split(batch_size):
        tokens = tokens.to(model.device)
        clean_CLV = model(tokens, use_cache=False).logits.float()
        sums["ce_clean"] += next_token_ce(clean_CLV, tokens).item() * len(tokens)
        for name, patch in patches.items():
            handle = module.register_forward_hook(splice_hook(patch, skip_positions))
            try:
                patched_CLV = model(tokens, use_cache=False).logits.float()
            finally:
                handle.remove()
            sums[f"ce_{name}"] += next_token_ce(patched_CLV, tokens).item() * len(tokens)
            kl = F.kl_div(patched_CLV.log_softmax(-1).flatten(0, 1), clean_CLV.log_softmax(-1).flatten(0, 1),
                          log_target=True, reduction="batchmean")
            sums[f"kl_{name}"] += kl.item() * len(tokens)
    return {key: total / len(tokens_CL) for key, total in sums.items()}


def evaluation_order(sae, x_TD):
    """The order held-out tokens are routed in: for an SAE whose codes depend on its batch (expert choice), a
    shuffle, as it was trained, keyed by each token's content (a hash of its projection on a fixed direction),
    so the held-out set's order changes no batch; for the others, as they are."""
    if not sae.batch_dependent:
        return torch.arange(len(x_TD), device=x_TD.device)
    direction_D = torch.randn(x_TD.shape[1], generator=torch.Generator().manual_seed(0)).to(x_TD.device)
    bits_T = (x_TD.float() @ direction_D).view(torch.int32).long()
    return (bits_T * 2654435761 % 2**32).argsort(stable=True)  # Knuth's multiplicative hash of the bits


def sae_patch(sae, chunk=1024):
    """A patch for lm_losses: the site's output replaced by the SAE's reconstruction, `chunk` tokens at a time
    (a batch-dependent SAE routes shuffled chunks of its training batch, as trained)."""
    def splice(h):
        x_TD = h.flatten(0, 1).float()
        order_T, x_hat_TD = evaluation_order(sae, x_TD), torch.empty_like(x_TD)
        x_hat_TD[order_T] = torch.cat([sae(x).x_hat for x in x_TD[order_T].split(chunk)])
        return x_hat_TD.view_as(h).to(h.dtype)
    return splice


@torch.no_grad()
def evaluate(sae, cfg, x_BD, model=None, module=None, tokens_CL=None):
    """Metrics on held-out activations x_BD; with the LM, its held-out contexts and the hooked module also
    the cross-entropy ones. dead_fraction counts latents that never fire on x_BD, dense_fraction those
    that fire on more than 10% of its tokens."""
    if not len(x_BD):
        raise ValueError("evaluate: x_BD holds no held-out activations")
    x_BD = x_BD.to(sae.device)
    n, totals = len(x_BD), dict.fromkeys(["sq_err", "cos", "norm_ratio", "l0"], 0.0)
    resid_sum, resid_sq = 0.0, 0.0
    fired_M = torch.zeros(sae.width, device=x_BD.device)
    load_N, unrouted = torch.zeros(sae.experts, device=x_BD.device), 0
    # dense baselines hold (batch, width) latents; expert choice routes within its batch: as trained
    chunk = cfg.batch_size if sae.batch_dependent else 1024
    for x in x_BD[evaluation_order(sae, x_BD)].split(chunk):
        out = sae(x)
        resid = x - out.x_hat
        totals["sq_err"] += resid.pow(2).sum()
        totals["cos"] += F.cosine_similarity(out.x_hat, x, dim=1).sum()
        totals["norm_ratio"] += (out.x_hat.norm(dim=1) / x.norm(dim=1)).sum()
        resid_sum, resid_sq = resid_sum + resid.sum(0), resid_sq + resid.pow(2).sum(0)
        fired, active = sae.latent_activity(out)
        fired_M += fired
        totals["l0"] += active
        load_N += len(x) if out.expert_counts is None else out.expert_counts
        unrouted += 0 if out.gates is None else (out.gates == 0).all(1).sum().item()
    resid_var = (resid_sq / n - (resid_sum / n) ** 2).sum()
    metrics = {
        "mse": (totals["sq_err"] / n).item(),
        "fve": (1 - resid_var / x_BD.var(0, correction=0).sum()).item(),
        "cos_sim": (totals["cos"] / n).item(),  # SAELens's and SAEBench's cossim
        "l2_ratio": (totals["norm_ratio"] / n).item(),  # |x_hat| / |x|: below 1 is shrinkage
        "l0": (totals["l0"] / n).item(),
        "dead_fraction": (fired_M == 0).float().mean().item(),
        "dense_fraction": (fired_M / n > 0.1).float().mean().item(),
        "expert_load": (load_N / n).tolist(),  # assignments a token to each: they sum to e (+ 1 shared)
        "dead_fraction_per_expert": (fired_M.view(sae.experts, -1) == 0).float().mean(1).tolist(),
        "unrouted_fraction": unrouted / n,  # tokens no expert took (expert choice), reconstructed by b_dec
        "eval_tokens": n,
    }
    if model is not None:
        patches = {"sae": sae_patch(sae, chunk), "zero": torch.zeros_like}
        lm = lm_losses(model, module, tokens_CL, cfg.lm_batch_size, patches, cfg.skip_positions)
        metrics.update(ce_clean=lm["ce_clean"], ce_sae=lm["ce_sae"], ce_zero=lm["ce_zero"],
                       delta_ce=lm["ce_sae"] - lm["ce_clean"], kl_sae=lm["kl_sae"], kl_zero=lm["kl_zero"],
                       frac_loss_recovered=(lm["ce_sae"] - lm["ce_zero"]) / (lm["ce_clean"] - lm["ce_zero"]))
    return metrics


def print_table(metrics):
    for key, value in metrics.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            shown = f"{len(value)} points (in metrics.json)"
        elif isinstance(value, list):
            shown = " ".join(f"{v:.3f}" for v in value)
        elif isinstance(value, dict):
            shown = ", ".join(f"{k} {v}" for k, v in value.items())
        else:
            shown = value if isinstance(value, str) else f"{value:.4g}"
        print(f"{key:>21}  {shown}")


# -----------------------------------------------------------------------------
# checkpoints: one safetensors file holds the SAE, its config and (for --resume) the training state;
# export writes the weights alone for other tools


def write_json(path, obj):
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text), len(text))


def atomic_write(path, write, size):
    """write(tmp) to a temporary file, then rename it over `path`: a crash or a full disk leaves the old
    file whole and no temporary behind. The file is made as readable as the umask allows (safetensors
    writes its files private). size: the bytes it needs, for the message when the disk is full."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with disk_space_for(path, size):
            write(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_checkpoint(out_dir, sae, cfg, step, opt=None, tokens_since_fired_M=None, comms=SINGLE_PROCESS,
                    digests=None):
    """Every rank calls this; expert shards are gathered, so the file is the same for any number of ranks.
    digests: of the data the run trains on (Source.digests), which --resume holds the data to."""
    from safetensors.torch import save_file

    params = dict(sae.named_parameters())
    names = list(params)  # Adam numbers its states in this order
    whole = lambda p, t: comms.gather_rows(t) if is_sharded(p) else t
    tensors = {name: whole(params.get(name), t.detach()).contiguous() for name, t in sae.state_dict().items()}
    if opt is not None:
        for i, state in opt.state_dict()["state"].items():
            p = params[names[i]]
            tensors.update({f"train.adam.{i}.{key}": (whole(p, v) if v.dim() else v).contiguous()
                            for key, v in state.items()})
        tensors["train.tokens_since_fired"] = whole(sae.W_dec, tokens_since_fired_M)
    meta = {"format": str(CHECKPOINT_FORMAT), "sae": json.dumps(sae_settings(cfg, sae.d_in)),
            "config": json.dumps(dataclasses.asdict(cfg)), "step": str(step), "data": json.dumps(digests)}
    if comms.rank == 0:
        write = lambda tmp: save_file(tensors, tmp, metadata=meta)
        atomic_write(os.path.join(out_dir, "sae.safetensors"), write, sum(t.nbytes for t in tensors.values()))


CHECKPOINT_FORMAT = 2  # files of other formats are refused, not read by code kept for them


def read_checkpoint(path, device="cpu", train_state=False, weights=True):
    """A checkpoint's metadata ({"sae", "config", "step"}) and its tensors (with train_state, also the
    optimizer's and the dead-latent clock; none without weights). A file cut short, corrupt, of another
    format or not written by this code (an export, another tool's) is refused in one line."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(path, "sae.safetensors") if os.path.isdir(path) else path  # a run, or its file
    if not os.path.isfile(path):
        raise UsageError(f"{path or 'an empty name'}: no such checkpoint (sae.safetensors); name a run "
                         "directory, or train one first")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            info = {"sae": json.loads(meta["sae"]), "config": json.loads(meta["config"]),
                    "step": int(meta["step"]), "format": meta.get("format"),
                    "data": json.loads(meta.get("data", "null"))}
            tensors = {key: f.get_tensor(key) for key in f.keys()
                       if weights and (train_state or not key.startswith("train."))}
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is no readable checkpoint of this code ({cause(e)}): it is cut short, "
                         "corrupt, or another tool's file (an export?); restore it, or remove it and train "
                         "again") from None
    if info["format"] != str(CHECKPOINT_FORMAT):
        old = info["format"] or "none recorded (an earlier one)"
        raise UsageError(f"{path} is of checkpoint format {old}, and this code reads format "
                         f"{CHECKPOINT_FORMAT} only: train it again")
    return info, tensors


def sae_from(info, tensors, device="cpu"):
    """The SAE a checkpoint holds, its header's settings held to RULES and its tensors to what a run saves:
    float32, finite, unit decoder rows where the kind keeps them, a positive input scale."""
    try:
        sae = make_sae(**info["sae"]).to(device)
        wrong = [name for name, t in tensors.items() if t.dtype != torch.float32]
        if wrong:
            raise TypeError(f"{', '.join(wrong)} not float32")
        sae.load_state_dict(tensors)
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise UsageError(f"the checkpoint's tensors do not match its SAE config {info['sae']} "
                         f"({cause(e)}): it is no SAE checkpoint of this code") from None
    if not all(t.isfinite().all() for t in sae.state_dict().values()):
        raise UsageError("the checkpoint's weights are NaN or infinite (saved by a run that diverged): "
                         "train it again")
    unit_rows = not sae.unit_decoder or (sae.W_dec.norm(dim=1) - 1).abs().max() < 1e-3
    if not unit_rows or sae.input_scale <= 0:
        raise UsageError("the checkpoint's decoder rows are not of unit norm, or its input scale is not "
                         "positive: it was edited, or is no checkpoint of this code")
    return sae


def load_sae(path, device="cpu"):
    """A trained SAE (SwitchSAE, or a baseline) from a run directory or its sae.safetensors file."""
    asked = device
    with contextlib.suppress(RuntimeError, TypeError):  # no device: refused below
        device = pick_device(device) if device == "auto" else torch.device(device)
    if not isinstance(device, torch.device) or device.type not in ("cpu", "cuda"):
        raise UsageError(f"load_sae: device {str(asked)!r} is none of cpu, cuda, cuda:N, auto")
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"load_sae: path {path!r} is no path: name a run directory or its sae.safetensors")
    if device.type == "cuda":
        pick_device("cuda")  # refused without a GPU
    return sae_from(*read_checkpoint(path, device), device)


def load_config(out_dir):
    path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(out_dir, "sae.safetensors")):
            raise UsageError(f"--resume: {path} is missing beside the run's checkpoint: restore it, or "
                             "start a new run in another --out")
        raise UsageError(f"--resume: no run to continue in {out_dir} (no config.json); drop --resume or "
                         "point --out at the run")
    try:
        fields = json.load(open(path))
        resumes = fields.pop("resumes", [])  # the run's history of --resume changes
        record = lambda r: isinstance(r, dict) and isinstance(r.get("changed"), dict) and all(
            isinstance(change, list) and len(change) == 2 for change in r["changed"].values())
        if not isinstance(resumes, list) or not all(map(record, resumes)):
            raise TypeError("its resumes are not a list of {step, changed: {field: [old, new]}} records")
        fields.update(text=tuple(fields["text"]), resume=True, out=str(out_dir))  # the run may have moved
        cfg = TrainConfig(**fields)
        check_fields(cfg)
        return cfg
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError) as e:
        raise UsageError(f"--resume: {path} is unreadable ({cause(e)}); restore it, or start "
                         "a new run in another --out") from None


def load_checkpoint(out_dir, sae, opt, tokens_since_fired_M, comms=SINGLE_PROCESS):
    """Restore weights, Adam state and the dead-latent clock (this rank's shard of each), held to what a run
    saves: every tensor there, none else; the weights as load_sae holds them (sae_from), the rest finite, of
    its shape, the counts not negative. Returns the step to continue from."""
    path = os.path.join(out_dir, "sae.safetensors")
    info, tensors = read_checkpoint(path, train_state=True)  # on the CPU: copied or sharded onto the device
    mine = lambda p, t: comms.shard_rows(t) if is_sharded(p) else t
    adam = {f"train.adam.{i}.{field}": p for i, p in enumerate(sae.parameters())
            for field in ("step", "exp_avg", "exp_avg_sq")}  # numbered as Adam numbers them
    expected = {*sae.state_dict(), *adam, "train.tokens_since_fired"}
    counts = [t for key, t in tensors.items() if key.endswith(("step", "exp_avg_sq", "tokens_since_fired"))]
    try:
        if set(tensors) != expected:
            raise KeyError(f"{', '.join(sorted(set(tensors) ^ expected))} missing or unknown")
        train_state = [t for key, t in tensors.items() if key.startswith("train.")]
        if info["step"] < 1 or not all(t.isfinite().all() for t in train_state) \
                or any((t < 0).any() for t in counts):
            raise ValueError("a value is NaN, infinite or a negative count")
        whole = sae_from(info, {name: tensors[name] for name in sae.state_dict()})  # load_sae's checks
        params = dict(sae.named_parameters())
        sae.load_state_dict({name: mine(params.get(name), t) for name, t in whole.state_dict().items()})
        state = {}
        for key, p in adam.items():
            i, field = key.split(".")[2:]
            value = tensors[key] if field == "step" else mine(p, tensors[key])
            if value.shape != (() if field == "step" else p.shape):
                raise ValueError(f"{key} is {tuple(value.shape)}")
            state.setdefault(int(i), {})[field] = value
        tokens_since_fired_M.copy_(mine(sae.W_dec, tensors["train.tokens_since_fired"]))
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    except UsageError:  # sae_from's: it says what is wrong with the weights
        raise
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise UsageError(f"--resume: {path} is not what a run of its config.json saves ({cause(e)}): restore "
                         "the pair, or start a new run in another --out") from None
    return info["step"]


@dataclass
class ExportConfig:
    """Export a trained SAE: its weights alone (no optimizer state), in another tool's format."""

    run: str = arg("out", "a run directory (or its sae.safetensors)", positional=True)
    dest: str = arg("export", "the directory to write", positional=True)
    format: str = arg("saelens", "saelens: cfg.json and sae_weights.safetensors as SAELens stores a "
                                 "pretrained SAE (topk for --experts 1; switch, a custom architecture, else)",
                      choices=("saelens",))


TRANSFORMER_LENS_HOOKS = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


def saelens_tensors(sae):
    """SAELens's architecture, apply_b_dec_to_input, tensors and cfg fields (sae.saelens()), with the input
    scale folded into the weights, so the export takes the LM's units as the SAE does. Its layouts: W_enc
    (d_in, d_sae), W_dec (d_sae, d_in); its encoders add b_enc (zeros where an SAE has none)."""
    if sae.batch_dependent:
        raise UsageError("an expert-choice SAE's codes depend on the batch, which SAELens's encode does not "
                         "see: it has no SAELens export")
    architecture, subtract_b_dec, tensors, fields = sae.saelens()
    s = sae.input_scale  # W (s x - b) = (s W)(x - b / s), and (z W_dec + b) / s = z (W_dec / s) + b / s
    scaled = {"W_enc": s, "W_router": s, "W_dec": 1 / s, "b_dec": 1 / s, "b_router": 1 / s}
    tensors = {name: t * scaled.get(name, 1) for name, t in tensors.items()}
    return architecture, subtract_b_dec, tensors, fields


def tokenizer_adds_bos(model):
    """Whether the run's contexts began with a BOS token (SAELens's prepend_bos): the tokenizer decides.
    None, with a note, where the tokenizer cannot be loaded here."""
    try:
        tokenizer = load_tokenizer(model)
    except (UsageError, OSError, ValueError) as e:
        print(f"note: prepend_bos left unset in cfg.json, the tokenizer of {model} did not load ({e})")
        return None
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def export(cfg, given=None):
    """Export a run in SAELens's pretrained-SAE layout: cfg.json and sae_weights.safetensors."""
    from safetensors.torch import save_file

    check_config(cfg, given, command="export")
    writable_place(cfg.dest, "export")
    info, tensors = read_checkpoint(cfg.run)
    sae, run = sae_from(info, tensors), info["config"]
    architecture, subtract_b_dec, tensors, fields = saelens_tensors(sae)
    layout = {"d_in": sae.d_in, "d_sae": sae.width, "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": subtract_b_dec, "normalize_activations": "none",
              "reshape_activations": "none", "architecture": architecture}
    layout.update(fields)  # switch: see the README's class (routing, gates, TopK over the gated latents)
    hook_name = f"blocks.{run['layer']}.{TRANSFORMER_LENS_HOOKS[run['site']]}"  # TransformerLens's name
    metadata = {"model_name": run["model"], "hook_name": hook_name, "hook_head_index": None,
                "context_size": run["ctx"], "dataset_path": ",".join(run["text"]) or run["dataset"],
                "prepend_bos": tokenizer_adds_bos(run["model"]),
                "seqpos_slice": [run["skip_positions"], None],
                "sae_lens_version": "6.0.0"}  # the version of the format followed, not a producer
    os.makedirs(cfg.dest, exist_ok=True)
    weights = {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(os.path.join(cfg.dest, "sae_weights.safetensors"), lambda tmp: save_file(weights, tmp),
                 sum(t.nbytes for t in weights.values()))
    write_json(os.path.join(cfg.dest, "cfg.json"), {**layout, "metadata": metadata})
    print(f"wrote {architecture} SAE ({sae.width} latents of {sae.d_in}) to {cfg.dest}")


# -----------------------------------------------------------------------------
# distributed: data and expert parallelism over torch.distributed (run under torchrun)


class TorchDistributed(SingleProcess):
    """SingleProcess's interface over the default torch.distributed process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.rank, self.ranks = dist, dist.get_rank(), dist.get_world_size()

    def all_reduce(self, t):
        self.dist.all_reduce(t)
        return t

    def gather_rows(self, t):
        parts = [torch.empty_like(t) for _ in range(self.ranks)]
        self.dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def shard_rows(self, t):
        return t[self.rank * len(t) // self.ranks : (self.rank + 1) * len(t) // self.ranks]

    def sum_batch_stats(self, out):
        if out.expert_counts is None:
            return out
        return out._replace(expert_counts=self.all_reduce(out.expert_counts.clone()))

    def average_gradients(self, sae):
        """Replicated parameters' gradients are summed over ranks; expert shards already hold the sum,
        gathered through the all_to_all. Then all are divided by the number of ranks."""
        for p in sae.parameters():
            if p.grad is not None:
                if not is_sharded(p):
                    self.all_reduce(p.grad)
                p.grad.div_(self.ranks)


def start_distributed(device):
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU); returns this rank's
    device and how to talk to the other ranks."""
    import torch.distributed as dist

    if world_size() == 1:
        return device, SINGLE_PROCESS
    if not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, TorchDistributed()


def stop_distributed(finished=False):
    """Leave the process group before exit: gloo work torn down during interpreter exit aborts the process.
    finished: every rank got here normally, so wait for all of them first (rank 0 may still evaluate)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class ExpertParallelSwitchSAE(SwitchSAE):
    """A SwitchSAE whose experts are split over the ranks: router and biases are replicated, rank r holds
    the encoder and decoder rows of experts [r N/G, (r+1) N/G). dispatch sends each token to its expert's
    rank and combine its decoded vector back, by all_to_all; gradients take the same roads in reverse.
    acts and idx in the output are those of the tokens this rank's experts received (shard-local idx)."""

    def __init__(self, d_in, width, experts, k, comms, router=None):
        super().__init__(d_in, width, experts, k, router)  # built whole from the seed: shards match 1 rank's
        assert experts % comms.ranks == 0 and self.router.slots == 1
        self.W_enc = nn.Parameter(comms.shard_rows(self.W_enc.detach()).clone())
        self.W_dec = nn.Parameter(comms.shard_rows(self.W_dec.detach()).clone())
        self.W_enc.expert_shard = self.W_dec.expert_shard = True
        self.comms, self.experts_here = comms, experts // comms.ranks

    def dispatch(self, x_BD, expert_B, counts_N):
        from torch.distributed._functional_collectives import all_to_all_single_autograd as exchange

        group, dist = self.comms.dist.group.WORLD, self.comms.dist
        order_B = expert_B.argsort(stable=True)  # by expert, hence by destination rank
        send_G = count(expert_B // self.experts_here, self.comms.ranks)
        recv_G = torch.empty_like(send_G)
        dist.all_to_all_single(recv_G, send_G)  # counts first, so the sizes are known
        send, recv = send_G.tolist(), recv_G.tolist()
        x_in = exchange(x_BD[order_B], recv, send, group)
        expert_in = exchange(expert_B[order_B], recv, send, group) - self.comms.rank * self.experts_here
        order_in = expert_in.argsort(stable=True)

        def combine(acts_TK, idx_TK, r):
            gate_B = r.gate
            decoded_in = SparseDecode.apply(acts_TK[:, : self.k], idx_TK[:, : self.k], self.W_dec)
            decoded_in = decoded_in[order_in.argsort()]
            decoded_BD = exchange(decoded_in, send, recv, group)[order_B.argsort()]
            gated_BD = decoded_BD * gate_B[:, None].to(decoded_BD.dtype)
            return gated_BD, acts_TK, idx_TK, None  # no gates: acts are of the tokens received

        return x_in[order_in], expert_in[order_in], count(expert_in, self.experts_here), combine


# -----------------------------------------------------------------------------
# bench: does routing turn FLOPs saved into time saved?


def train_field(name, default=dataclasses.MISSING):
    """TrainConfig's field `name`, with its help (and maybe another default): one meaning, one text."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return dataclasses.field(default=field.default if default is dataclasses.MISSING else default,
                             metadata=field.metadata)


@dataclass
class BenchConfig(SAEConfig):
    """Time training steps: of an SAE (a Switch SAE by default) and of a TopK SAE of the same width, on
    random activations; optionally also LM activation capture."""

    d_in: int = arg(768, "activation dimension", low=1)
    batch_size: int = train_field("batch_size", 4096)
    dtype: str = arg("float32", "dtype of the SAE weights and data", choices=("float32", "bfloat16"))
    steps: int = arg(5, "timed steps of each SAE, alternating, after 2 warm-up steps", low=1, high=10**6)
    profile: bool = arg(False, "also print where each SAE's step time goes (torch.profiler), on stderr")
    model: str = arg("", "also time capture: a config name (gpt2, llama, ...) or a model directory; "
                         "random weights")
    layer: int = train_field("layer")
    ctx: int = train_field("ctx")
    lm_batch_size: int = train_field("lm_batch_size")
    lm_dtype: str = train_field("lm_dtype")
    compile: bool = train_field("compile")
    expert_parallel: bool = train_field("expert_parallel")
    device: str = train_field("device")
    json: bool = arg(False, "print one JSON object instead of a table")


def peak_memory_mb(device, reset=False):
    """Peak memory since the last reset: allocated on CUDA, the process's resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats() if reset else torch.cuda.max_memory_allocated() / 2**20
    if reset:  # Linux: writing 5 resets VmHWM
        return pathlib.Path("/proc/self/clear_refs").write_text("5")
    return int(pathlib.Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def timed(fn, device, repeats):
    """Median seconds of fn() over repeats, with the device synchronised around each call."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(cfg, sae, x_BD, comms=SINGLE_PROCESS):
    """A training step of `sae` as train() takes it, at a fixed lr, ready to time."""
    opt, clock_M = make_optimizer(sae), torch.zeros(len(sae.W_dec), dtype=torch.long, device=x_BD.device)
    coefs = type(sae).loss_coefficients(cfg, 0, 1)

    def step():
        out, _ = train_step(sae, opt, x_BD, 1e-4, coefs, 1.0, comms, compile=cfg.compile)
        tick_dead_clock(clock_M, sae, out, comms)

    return step


def bench_sae_steps(cfg, device, dtype):
    """Median step time, peak memory and FLOPs a token of each SAE, timed alternately so drift hits both
    alike."""
    x_BD = torch.randn(cfg.batch_size, cfg.d_in, device=device, dtype=dtype)
    runs = {}
    topk = dict(arch="switch", d_in=cfg.d_in, width=cfg.width, experts=1, k=cfg.k)
    for name, settings in (("sae", sae_settings(cfg, cfg.d_in)), ("topk", topk)):
        torch.manual_seed(0)
        sae = make_sae(**settings).to(device, dtype)
        sae.init_biases_(x_BD)
        step = bench_step(dataclasses.replace(cfg, arch=settings["arch"]), sae, x_BD)
        step()
        peak_memory_mb(device, reset=True)
        step()
        runs[name] = {"step": step, "times": [], "peak_mem_mb": peak_memory_mb(device),
                      "flops": sae.flops_per_token(cfg.batch_size)["total"]}
    for _ in range(cfg.steps):
        for run in runs.values():
            run["times"].append(timed(run["step"], device, 1))
    if cfg.profile:
        for name, run in runs.items():
            with torch.profiler.profile() as prof:
                timed(run["step"], device, 3)
            sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort_by, row_limit=15)
            print(f"{name}: 3 steps\n{table}", file=sys.stderr)
    return {name: (statistics.median(r["times"]), r["peak_mem_mb"], r["flops"]) for name, r in runs.items()}


def bench_expert_parallel(cfg, device, comms):
    """Per-rank step time of an expert-parallel Switch SAE and the bytes each rank sends per step."""
    rank, ranks = comms.rank, comms.ranks
    torch.manual_seed(rank)
    x_BD = torch.randn(cfg.batch_size // ranks, cfg.d_in, device=device)
    torch.manual_seed(0)
    router = make_router(cfg.experts, **router_fields(cfg))
    sae = ExpertParallelSwitchSAE(cfg.d_in, cfg.width, cfg.experts, cfg.k, comms, router).to(device)
    step = bench_step(cfg, sae, x_BD, comms)
    step()
    seconds = timed(step, device, cfg.steps)
    with torch.no_grad():
        leaving = (sae.route(x_BD).expert // sae.experts_here != rank).sum().item()
    replicated = sum(p.numel() for p in sae.parameters() if not is_sharded(p))
    # each token leaving: its activation and expert id out, its decoded vector back, that vector's gradient
    # out; plus the counts and the ring all-reduce of the replicated gradients
    sent = leaving * (3 * cfg.d_in * 4 + 8) + 2 * ranks * 8 + 2 * (ranks - 1) / ranks * replicated * 4
    stats = comms.gather_rows(torch.tensor([[seconds * 1e3, sent]], device=device)).tolist()
    return {"ranks": ranks, "step_ms_per_rank": [ms for ms, _ in stats],
            "bytes_sent_per_rank": [b for _, b in stats], "global_batch": cfg.batch_size,
            "tokens_per_s": cfg.batch_size / max(ms for ms, _ in stats) * 1e3}


def matmul_tflops(cfg, device, dtype):
    """Measured dense matmul rate of the encoder's shape: the peak that MFU is reported against."""
    a = torch.randn(cfg.batch_size, cfg.d_in, device=device, dtype=dtype)
    b = torch.randn(cfg.d_in, cfg.width, device=device, dtype=dtype)
    torch.mm(a, b)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / timed(lambda: torch.mm(a, b), device, 3) / 1e12


def bench_lm_config(cfg):
    """The config of the LM whose capture bench times, checked (--model, --ctx, --layer) before any SAE is."""
    from transformers import AutoConfig

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging

    logging.set_verbosity_error()  # its warnings would come before our one line
    try:
        from_dir = os.path.isdir(cfg.model)
        config = AutoConfig.from_pretrained(cfg.model) if from_dir else AutoConfig.for_model(cfg.model)
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"a {config.model_type} is no causal LM")
    except (OSError, ValueError) as e:
        raise UsageError(f"bench --model {cfg.model} ({cause(e)}): name a causal LM's config (gpt2, llama, "
                         "...) or a model directory") from None
    check_positions(config, cfg.ctx)
    check_layer(cfg.layer, config.num_hidden_layers)
    if config.hidden_size != cfg.d_in:  # its time per token is added to the SAE's
        raise UsageError(f"bench --d-in {cfg.d_in}, but --model {cfg.model} has d = {config.hidden_size}: "
                         f"give --d-in {config.hidden_size}")
    return config


def bench_capture(cfg, config, device):
    """Tokens per second and TFLOP/s of an LM forward stopped at the hooked layer (random weights)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    dtype = lm_dtype(cfg.lm_dtype, device)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    module = hooked_module(model, cfg.layer, "resid")
    tokens = torch.randint(0, config.vocab_size, (cfg.lm_batch_size, cfg.ctx), device=device)
    capture = lambda: lm_activations(model, module, tokens, cfg.lm_batch_size)
    capture()
    with FlopCounterMode(display=False) as counter:
        capture()
    seconds = timed(capture, device, 3)
    return tokens.numel() / seconds, counter.get_total_flops() / seconds / 1e12


def bench(cfg, given=None):
    check_config(cfg, given, command="bench", ranks=world_size())
    device, comms = start_distributed(pick_device(cfg.device))
    check_resources(cfg, cfg.d_in, device, saes=2)
    lm_config = bench_lm_config(cfg) if cfg.model and not cfg.expert_parallel else None
    dtype = getattr(torch, cfg.dtype)
    if cfg.expert_parallel:
        result = bench_expert_parallel(cfg, device, comms)
    else:
        runs = bench_sae_steps(cfg, device, dtype)
        (sae_s, sae_mem, _), (topk_s, topk_mem, _) = runs.values()
        flops = {name: run[2] for name, run in runs.items()}
        m = cfg.width // cfg.experts
        probe = torch.empty(1, cfg.d_in, device=device)
        peak = matmul_tflops(cfg, device, dtype)
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "arch": cfg.arch, "experts": cfg.experts, "width": cfg.width, "k": cfg.k,
            "d_in": cfg.d_in, "batch_size": cfg.batch_size, "dtype": cfg.dtype, "compile": cfg.compile,
            "expert_matmul": GROUPED_MM.__name__ if use_grouped_mm(probe, m) else "loop",
            "sae_step_ms": sae_s * 1e3, "topk_step_ms": topk_s * 1e3, "speedup": topk_s / sae_s,
            "sae_flops_per_token": flops["sae"], "topk_flops_per_token": flops["topk"],
            "flop_ratio": flops["topk"] / flops["sae"],
            "achieved_tflops": flops["sae"] * cfg.batch_size / sae_s / 1e12,
            "topk_achieved_tflops": flops["topk"] * cfg.batch_size / topk_s / 1e12,
            "matmul_tflops": peak, "mfu": flops["sae"] * cfg.batch_size / sae_s / 1e12 / peak,
            "peak_mem_mb": sae_mem, "topk_peak_mem_mb": topk_mem, "sae_tokens_per_s": cfg.batch_size / sae_s,
        }
        if lm_config:
            tokens_per_s, capture_tflops = bench_capture(cfg, lm_config, device)
            lm_s, sae_token_s = 1 / tokens_per_s, sae_s / cfg.batch_size
            result.update(capture_dtype=str(lm_dtype(cfg.lm_dtype, device)), capture_tflops=capture_tflops,
                          capture_tokens_per_s=tokens_per_s, capture_mfu=capture_tflops / peak,
                          lm_share=lm_s / (lm_s + sae_token_s),
                          hours_for_819M_tokens=819.2e6 * (lm_s + sae_token_s) / 3600)
    if comms.rank == 0:
        print(json.dumps(result)) if cfg.json else print_table(result)
    return result


# -----------------------------------------------------------------------------
# command line


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as for any other bad input, not usage and error
        raise UsageError(f"{message} (see {self.prog} --help)")


def flags_given(argv, cls=TrainConfig, prog=None):
    """The fields that command-line flags set, one flag per dataclass field (--field-name), as a dict."""
    commands = "; ".join(f"{name}: {config.__doc__.split(':')[0]}" for name, (config, _) in COMMANDS.items())
    epilog = f"other commands, each with its --help: {commands}" if cls is TrainConfig else None
    parser = FlagParser(prog=prog, description=cls.__doc__, epilog=epilog, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        rule = f.metadata
        if rule["positional"]:
            parser.add_argument(f.name, help=rule["help"])
        elif f.type is bool:
            parser.add_argument(cli_flag(f.name), action="store_true", help=rule["help"])
        elif f.type is tuple:
            accepts = f" (one or more of {', '.join(rule['choices'])})" if rule["choices"] else ""
            parser.add_argument(cli_flag(f.name), nargs="+", type=rule["item"], help=rule["help"] + accepts)
        else:
            accepts = f"one of {', '.join(rule['choices'])}; " if rule["choices"] else ""
            accepts += "" if rule["low"] is None else f"at least {rule['low']}; " if rule["high"] is None \
                else f"{rule['low']} to {rule['high']}; "
            help = f"{rule['help']} ({accepts}default {f.default})"
            parser.add_argument(cli_flag(f.name), type=f.type, help=help)
    given = vars(parser.parse_args(argv))
    return {key: tuple(value) if isinstance(value, list) else value for key, value in given.items()}


def keep_freed_memory():
    """glibc hands freed blocks over 32 MB back to the OS, so a CPU step page-faults its 75 MB gradient
    and temporary buffers anew every time; keeping them mapped saves ~100 ms a step at width 24576."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2**31)  # M_TRIM_THRESHOLD


COMMANDS = {"bench": (BenchConfig, bench), "cache": (CacheConfig, write_cache),
            "export": (ExportConfig, export)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    cls, run = COMMANDS.get(command, (TrainConfig, train))
    try:
        given = flags_given(argv[1:] if command else argv, cls, f"switch_sae.py {command}".strip())
        run(cls(**given), set(given))  # each command refuses the flags it was given and has no use for
        stop_distributed(finished=True)
    except UsageError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    except Stopped as e:  # the checkpoint is saved; a scheduler or a following && still sees the stop
        sys.exit(128 + e.args[0])
    except KeyboardInterrupt as e:  # a second signal, or Ctrl-C outside training: at once, without a save
        print("error: interrupted; a run's last checkpoint stays whole and continues with --resume, an "
              "unfinished cache was removed", file=sys.stderr)
        sys.exit(128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT))
    finally:
        stop_distributed()


if __name__ == "__main__":
    main()
