"""The seed's example: a causal crosscoder on pythia-70m, layers 0-2 -> 3-5, trained on TinyStories.

Needs the Hugging Face Hub (model and dataset download), so it is documented, not run in CI.
    python scripts/example_train_pythia70m_crosscoder.py
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/example_train_pythia70m_crosscoder.py
"""

from hf_crosscoder import LanguageModelCrosscoderRunnerConfig, LanguageModelCrosscoderTrainingRunner

if __name__ == "__main__":
    cfg = LanguageModelCrosscoderRunnerConfig(
        model_name="EleutherAI/pythia-70m",
        dataset_path="roneneldan/TinyStories",
        hook_names_in=[f"blocks.{i}.hook_resid_post" for i in range(3)],
        hook_names_out=[f"blocks.{i}.hook_resid_post" for i in range(3, 6)],
        d_model=512,
        d_sae=4096,
        architecture="crosscoder",
        training_tokens=10_000_000,
        l1_coefficient=2.0,
        l1_warmup_steps=122,  # 5% of the 2441 steps (the crosscoder replication's recipe)
        lr=5e-5,
        lr_decay_steps=488,  # linear decay over the last 20%
        output_path="./my_crosscoder",
    )
    LanguageModelCrosscoderTrainingRunner(cfg).run()
