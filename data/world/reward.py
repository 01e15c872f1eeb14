"""The embedded world's exact reward for online SPL (train.py --loss spl-online on the world): the population's
log-probability of an option, a floor for every other text. spl/online.py trains against any reward with this
call signature; a reward model's (spl.online.RewardModelReward) is the other."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spl.online import DEFAULT_FLOOR, OnlinePrompt, Rollouts, noise_proof_floor
from spl.theory import log_num_completions


@dataclass(frozen=True)
class WorldReward:
    """The embedded world's exact reward on its opinion questions, a function of the token sequence:

        r(x_q, y) = log p_q(o)   if y is exactly option o's tokens, enc(o) + EOS  (the Bradley-Terry score)
                  = floor        for any other completion (another option's text tokenised differently, a
                                 truncated or unfinished one, anything else).

    r = log p is the population's Bradley-Terry reward up to a per-prompt constant (data/world/__init__.py), which
    RLOO and the optimum ignore. `prompts[q]` are question q's chat prompt ids."""
    prompts: tuple[tuple[int, ...], ...]
    options: tuple[dict, ...]  # per question: option response ids (a tuple, EOS included) -> log p
    floor: float

    @classmethod
    def from_questions(cls, questions, tokenizer, floor: float = DEFAULT_FLOOR) -> "WorldReward":
        if not math.isfinite(floor):
            raise ValueError(f"WorldReward: the floor must be a finite number, got {floor!r}")
        prompts = tuple(tuple(tokenizer.encode_prompt([{"role": "user", "content": q.prompt}])) for q in questions)
        options = tuple({tuple(tokenizer.encode_response(o)): math.log(p) for o, p in zip(q.options, q.population)}
                        for q in questions)
        return cls(prompts, options, float(floor))

    def __call__(self, question_indices, rollouts: Rollouts) -> torch.Tensor:
        """Rewards [P, K] of the rollouts of questions `question_indices` (P of them)."""
        return torch.tensor([[self.options[q].get(tuple(c), self.floor) for c in row]
                             for q, row in zip(question_indices, rollouts.completions)], dtype=torch.float64)

    def is_option(self, question_indices, rollouts: Rollouts) -> torch.Tensor:
        """Whether each completion [P, K] is one of its question's options."""
        return torch.tensor([[tuple(c) in self.options[q] for c in row]
                             for q, row in zip(question_indices, rollouts.completions)])


def world_reward_for_prompts(questions, tokenizer, prompts: list[OnlinePrompt], floor: float) -> WorldReward:
    """The world's exact reward indexed like `prompts` (which must all be opinion questions' prompts)."""
    by_prompt = {tuple(tokenizer.encode_prompt([{"role": "user", "content": q.prompt}])): q for q in questions}
    missing = [p.index for p in prompts if tuple(p.prompt_ids) not in by_prompt]
    if missing:
        raise ValueError(f"the world's exact reward knows only its opinion questions; prompt {missing[0]} of the "
                         f"data is not one of them ({len(missing)} are not): give --reward-model RUN_DIR")
    return WorldReward.from_questions([by_prompt[tuple(p.prompt_ids)] for p in prompts], tokenizer, floor)


def exact_reward_floor(alpha: float, beta: float, max_new_tokens: int, vocab_size: int,
                       reward_floor: float | None = None) -> tuple[float, float]:
    """(the floor of the world's exact reward: `reward_floor` or spl.online.noise_proof_floor, log N): N the
    completions of at most `max_new_tokens` tokens over the world model's vocabulary (its tokenizer's)."""
    log_num_texts = log_num_completions(max_new_tokens, vocab_size)
    floor = reward_floor if reward_floor is not None else noise_proof_floor(alpha, beta, log_num_texts)
    return floor, log_num_texts
