"""DPO on HH-RLHF preference pairs. Not implemented yet: this script is a placeholder until its issue lands."""
import sys


def main(argv=None):
    sys.exit("train_dpo.py: not implemented yet (DPO on HH-RLHF preference pairs)")


if __name__ == "__main__":
    main()
