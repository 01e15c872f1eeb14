"""Sample completions from a model (placeholder until sampling lands)."""


def main():
    print("spl: sampling is not built yet")


if __name__ == "__main__":
    main()
