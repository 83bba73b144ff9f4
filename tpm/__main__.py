"""``python -m tpm COMMAND``: the ``tpm`` command line, also under launchers
(``accelerate launch -m tpm train ...``, ``torchrun -m tpm train ...``)."""

from tpm.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
