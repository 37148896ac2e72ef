"""Classify digits with the Python client: one image, a batch, and (optionally) a picture.

    pip install ./clients/python
    python examples/digits_client.py [http://127.0.0.1:8000] [my_digit.jpg]

Images are MNIST-style 28×28 pixels, 0–255, white ink on black (nested lists or NumPy arrays;
floats in 0–1 work too); a picture (PNG, JPEG, …, dark ink on light paper) is uploaded and
preprocessed by the service. ``tests/test_examples.py`` runs it against the real server.
"""

import sys

from rnn_serving_client import Client, InvalidInput

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
# A crude "1": a vertical bar of ink, and a "7": a bar on top and a diagonal.
one = [[255 if 6 <= r < 22 and 13 <= c <= 14 else 0 for c in range(28)] for r in range(28)]
seven = [[255 if (r in (6, 7) and 7 <= c < 21) or (r >= 6 and c == 27 - r) else 0
          for c in range(28)] for r in range(28)]  # fmt: skip

with Client(URL) as client:
    print(client.health())
    answer = client.predict_digit(one)
    print(f"one image: predicted {answer.digit} ({answer.confidence:.2f}) by {answer.model}")
    batch = client.predict_digits([one, seven])
    print("a batch: predicted", [p.digit for p in batch])
    if len(sys.argv) > 2:
        print("the picture: predicted", client.predict_digit(sys.argv[2]).digit)
    try:
        client.predict_digit([[0] * 27] * 28)
    except InvalidInput as exc:  # typed errors carry the service's code, detail and status
        print(f"refused: {exc.code} ({exc.status})")
