"""Rollouts, grouped by concern in layers (a group imports only from the layers below it; checked by .importlinter):

functions.py | factory.py  >  tools/ | data/ | sglang/  >  rewards/  >  engines/

- functions.py: the rollout functions (single turn, the tool loop, or a user's "package.module:function") that turn
  a round of prompt items into samples. It stays at this level, beside tools/ rather than in it, because it is the
  seam users name in `rollout.function` and chooses between one plain engine call and tools/'s multi-turn loop.
- factory.py: builds the engine the config names (embedded or SGLang), the colocated ranks' weight senders and the
  SGLang teacher; the trainer reaches rollout.sglang only through it. It imports both engine packages, and sglang/
  implements the interface in engines/, so the factory sits above them rather than inside engines/.
- tools/: tool calls inside a rollout (formats, registry, sandbox, the multi-turn loop).
- data/: prompt datasets and their resumable loader, and the synthetic CPU tasks (whose rewards register here).
- sglang/: the SGLang engine over HTTP, its weight sync, launcher, keepers and teacher.
- rewards/: the reward functions, the HTTP reward client and the runner that scores a batch.
- engines/: the engine interface every engine implements, and the in-process (transformers) engine.
"""
from grpo_megatron.rollout.data import tasks  # noqa: F401  (registers the synthetic tasks' rewards)
