"""AsyncDiff's alternative (§5, Eq. 19-20): scale the Euler step instead of re-timing the denoiser.

The denoiser is queried at the latent's own time (``tau_cond = tau_k``) and the update becomes

    x_{k+1} = x_k + w * dt_k * v(x_k, t_k),   w = 0.5 + r,   r ~ Beta(alpha, beta)   (Eq. 19-20)

so w < 1 leaves some noise to be read as data and w > 1 removes more than the step's share.
``(alpha, beta)`` come from the same network as the TPM (``policies.tpm.TPMNetwork``, phi of
Eq. 17, the mode of Eq. 18 at evaluation; ``gamma`` scales ``r - 0.5`` and ``lifted_bound``
doubles it, as for the TPM). The time bookkeeping keeps the synchronous grid; the sampler applies
``Action.step_scale``. A decision is taken at every step, k = 0 included (velocity and x0 inputs
are zeros there).
"""

from __future__ import annotations

from policies.tpm import BetaPolicy, deviation_factor, network_inputs
from tpm.fields import synchronous_next
from tpm.policy import Action, PolicyError, State, register_policy


@register_policy("velocity_scale")
class VelocityScale(BetaPolicy):
    """Per-sample step scale w = 0.5 + r (AsyncDiff Eq. 20) learned with GRPO."""

    paper = "AsyncDiff: Asynchronous Timestep Conditioning for Enhanced Text-to-Image Diffusion Inference (velocity scaling, §5, Eq. 19-20)"

    def check_backbone(self, backbone) -> None:
        # Scaling the update presumes a deterministic step along v; DDPM's ancestral update is not one.
        if not getattr(backbone, "euler_update", True):
            raise PolicyError("velocity_scale scales the Euler/DDIM update step, which has no counterpart in the "
                              "ancestral DDPM update; sample with DDIMScheduler or EulerDiscreteScheduler")

    def act(self, state: State) -> Action:
        cfg = self.config
        memory = state.memory
        decision = self.decide(network_inputs(state, cfg, memory.get("prev_cond"), memory.get("prev_tau")))
        # Eq. 20 is w = 0.5 + r; deviation_factor gives exactly that at gamma = 1, unlifted.
        w = deviation_factor(decision.action["r"], cfg.gamma, cfg.lifted_bound)
        memory["prev_tau"] = state.tau.detach()
        memory["prev_cond"] = state.tau.detach()
        return Action(tau_next=synchronous_next(state), tau_cond=None, step_scale=w.to(state.tau.dtype),
                      log_prob=decision.log_prob, extras=decision.record)
