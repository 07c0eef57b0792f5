"""Train a crosscoder: `accelerate launch scripts/train.py --model_name ... --hook_names_in a b ...`
(or `python scripts/train.py ...` on one process). Flags: `--help`, or `--config file.yaml`."""

from hf_crosscoder.llm_crosscoder_training_runner import main

if __name__ == "__main__":
    main()
