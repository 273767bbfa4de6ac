"""QLoRA SFT (LaMini → Orca → Evol-Instruct, then HH-RLHF). Not implemented yet: this script is a placeholder until its issue lands."""
import sys


def main(argv=None):
    sys.exit("train_sft.py: not implemented yet (QLoRA SFT (LaMini → Orca → Evol-Instruct, then HH-RLHF))")


if __name__ == "__main__":
    main()
