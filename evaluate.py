"""LM-Eval-Harness tasks and MT-Bench. Not implemented yet: this script is a placeholder until its issue lands."""
import sys


def main(argv=None):
    sys.exit("evaluate.py: not implemented yet (LM-Eval-Harness tasks and MT-Bench)")


if __name__ == "__main__":
    main()
