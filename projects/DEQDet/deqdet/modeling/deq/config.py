"""``add_deqdet_decoder_config``: the keys of the deep-equilibrium decoder (``MODEL.DEQDET``)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_deqdet_decoder_config"]


def add_deqdet_decoder_config(cfg: CN) -> None:
    """Add ``MODEL.DEQDET`` (used when ``MODEL.QUERY.DECODER`` is ``"DEQDecoder"``)."""
    cfg.MODEL.DEQDET = d = CN()
    # --- training (the defaults of DEQDetRoIHead in the official code, MCG-NJU/DEQDet) ---
    # No-grad applications of the refinement stage f per training iteration.
    d.REFINEMENT_STEPS = 20
    # After how many no-grad steps a supervised segment starts (each in 1..REFINEMENT_STEPS).
    d.SUPERVISION_POSITIONS = (1, 3, 6, 9, 12, 20)
    # Refinement-aware gradient: applications of f WITH gradient in each supervised segment, from the
    # no-grad state. 0 = the plain one-step gradient: the position's own step is recomputed with gradient.
    d.RAG = 2
    # Extra supervised applications of f after the init stage (their gradient reaches the init stage).
    d.EXTRA_INIT_SUPERVISIONS = 2
    # Refinement-aware perturbation before each no-grad step: with PERTURB_CONTENT_PROB the content q
    # becomes (1 - I) q + I ||q|| eps (I = PERTURB_CONTENT_INTENSITY); with PERTURB_POSITION_PROB the
    # box corners (xyxy pixels) move by PERTURB_POSITION_INTENSITY * eps and are re-encoded with |w|, |h|,
    # the step's IoF attention bias using the raw corners (as MCG-NJU/DEQDet). eps ~ N(0, 1).
    d.PERTURB_CONTENT_PROB = 0.2
    d.PERTURB_CONTENT_INTENSITY = 0.1
    d.PERTURB_POSITION_PROB = 0.2
    d.PERTURB_POSITION_INTENSITY = 25.0
    # Memory-lean training: backpropagate every supervised segment (the init stage, the applications of f
    # after it, each position's RAG steps) inside the forward through detached features and queries and
    # stash the gradients: the decoder's activation memory is that of its largest segment, whatever the
    # number of positions. False: every segment stays in one graph until the trainer's backward (same
    # gradients).
    d.GRAD_STASH = True
    # --- inference ---
    # The answer: "refined" (official: the refinement stage iterated as TOL / MAX_ITERS say, then its
    # output application) or "init" (the init stage's prediction, no refinement step: for checkpoints
    # trained too briefly for the refinement stage to improve on it, as the shapes demo).
    d.TEST_OUTPUT = "refined"
    # Stop iterating f for an image once the relative residual ||z_k+1 - z_k|| / ||z_k|| of its state is
    # below TOL (0: never, the official fixed schedule). Then one more application gives the output.
    d.TOL = 0.0
    # At most MAX_ITERS iterations before that output application (official: 20, i.e. 20 + 1 steps).
    d.MAX_ITERS = 20
    # Run the inference applications of the refinement stage through torch.compile (opt-in). The first
    # inference compiles (once more when the input shape first changes, then shape-generic); the
    # compile time and the speed-up are measured by `make bench`.
    # Training and tools/export.py use the plain stage.
    d.COMPILE = False
    # On CUDA with TOL 0: record the init stage and the 20 + 1 steps as a CUDA graph per input shape
    # and replay it, without the kernel launch gaps (speed-up: benchmarks/results/bench_cuda_800x1333.md).
    # Each new padded input shape records once more; ignored on CPU. tools/export.py turns it off.
    d.CUDA_GRAPH = False
