"""Dynamic quantization of a Linear-heavy text classifier (an EmbeddingBag and three
Linears): int8 weights, activations quantized at run time, no calibration.

There is no text data set on this machine, so the data is synthetic, generated
deterministically from a seed: a sequence of the class's keywords mixed into random tokens."""

import argparse

import torch
from torch import nn

import qat

VOCAB, CLASSES, LENGTH, KEYWORDS = 5000, 4, 32, 100


def synthetic_tokens(n: int, seed: int, signal: float = 0.25):
    """(tokens [n, LENGTH], labels [n]): a share ``signal`` of each sequence is drawn from
    its class's KEYWORDS token ids, the rest uniformly from the whole vocabulary."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    filler = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    keywords = torch.randint(0, KEYWORDS, (n, LENGTH), generator=g) + labels[:, None] * KEYWORDS
    return torch.where(torch.rand(n, LENGTH, generator=g) < signal, keywords, filler), labels


def text_classifier() -> nn.Module:
    return nn.Sequential(nn.EmbeddingBag(VOCAB, 64), nn.Linear(64, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=20000, help="training sequences")
    parser.add_argument("--limit", type=int, default=5000, help="test sequences")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens, labels = synthetic_tokens(args.train_limit, seed=1)
    test_tokens, test_labels = synthetic_tokens(args.limit, seed=2)
    model = text_classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(0, len(tokens), 64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens[i:i + 64]), labels[i:i + 64]).backward()
        optimizer.step()
    model.eval()

    qmodel = qat.prepare(model, qat.presets.w8a8_dynamic())
    # Weights only, so no data is needed. The EmbeddingBag's table is stored as int8 rows
    # and its bags summed by quantized::embedding_bag_byte.
    int_model, report = qat.convert(qmodel, return_report=True)
    print(report)
    with torch.no_grad():
        expected, got = model(test_tokens), int_model(test_tokens)
    for name, out in (("float", expected), ("dynamic int8", got)):
        print(f"{name} accuracy {(out.argmax(1) == test_labels).float().mean().item():.4f}")
    agreement = (expected.argmax(1) == got.argmax(1)).float().mean().item()
    sqnr = 10 * torch.log10(expected.pow(2).sum() / (expected - got).pow(2).sum()).item()
    print(f"float vs dynamic: top-1 agreement {agreement:.4f}, max output difference "
          f"{(expected - got).abs().max().item():.4g}, SQNR {sqnr:.1f} dB")
