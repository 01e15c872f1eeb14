"""Train a policy with Soft Preference Learning (placeholder until the training loop lands)."""


def main():
    print("spl: the training loop is not built yet")


if __name__ == "__main__":
    main()
