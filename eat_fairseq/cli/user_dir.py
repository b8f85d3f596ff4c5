"""Print the ``common.user_dir`` value for fairseq-hydra-train: the installed package's folder.

fairseq requires the user-dir basename to be globally unique; pointing it at this exact folder
(the one ``import eat_fairseq`` loads) avoids the "not globally unique" error.
"""
from __future__ import annotations


def main() -> None:
    import eat_fairseq

    print(eat_fairseq.USER_DIR)


if __name__ == "__main__":
    main()
