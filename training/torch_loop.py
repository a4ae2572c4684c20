"""A plain PyTorch training loop for the Keras model, used by train.py on the PyTorch backend.

Why not `model.fit` there: on a lent H200, Keras' fit on the torch backend ran at 170-330 ms a step, bound by
Python and by copying every batch from host memory. Here the whole uint8 image set sits on the device once,
batches are gathered there, and the same Keras augmentation layers and Keras model run as torch modules
(Keras 3 layers are torch modules on this backend), so a step is one forward and one backward pass.

Same recipe as the fit path: Adam, sparse categorical cross-entropy, a cosine learning-rate decay over the
planned epochs, early stopping on validation loss with the best weights restored.
"""

from __future__ import annotations

import math
import time

import numpy as np


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Keras' CosineDecay(base_lr, total_steps) with alpha 0, as a plain function."""
    progress = min(step, total_steps) / max(1, total_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


class TorchTrainer:
    """Holds the data on the device; `run_phase` trains whatever variables of `model` are trainable."""

    def __init__(self, model, augmenter, x_train, y_train, x_val, y_val, val_domains, batch_size: int, seed: int):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.augmenter, self.batch_size = model, augmenter, batch_size
        self.x_train = torch.from_numpy(np.ascontiguousarray(x_train)).to(self.device)
        self.y_train = torch.from_numpy(np.asarray(y_train, np.int64)).to(self.device)
        self.x_val = torch.from_numpy(np.ascontiguousarray(x_val)).to(self.device)
        self.y_val = torch.from_numpy(np.asarray(y_val, np.int64)).to(self.device)
        self.val_domains = np.asarray(val_domains)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.y_train) / self.batch_size)

    def _loss(self, probs, targets):
        probs = probs.float().clamp_min(1e-7)
        return self.torch.nn.functional.nll_loss(probs.log(), targets)

    def _train_step(self, optimizer, idx):
        x = self.x_train[idx].float()
        x = self.augmenter(x, training=True)
        probs = self.model(x, training=True)
        loss = self._loss(probs, self.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct = (probs.argmax(1) == self.y_train[idx]).sum()
        return loss.detach() * len(idx), correct

    def evaluate(self) -> dict:
        torch = self.torch
        losses, hits = [], []
        with torch.no_grad():
            for start in range(0, len(self.y_val), 256):
                x = self.x_val[start:start + 256].float()
                probs = self.model(x, training=False).float().clamp_min(1e-7)
                y = self.y_val[start:start + 256]
                losses.append(torch.nn.functional.nll_loss(probs.log(), y, reduction="none"))
                hits.append(probs.argmax(1) == y)
        losses = torch.cat(losses).cpu().numpy()
        hits = torch.cat(hits).cpu().numpy()
        logs = {"val_loss": float(losses.mean()), "val_accuracy": float(hits.mean())}
        for domain in np.unique(self.val_domains):
            logs[f"val_accuracy_{domain}"] = float(hits[self.val_domains == domain].mean())
        return logs

    def time_steps(self, steps: int = 12) -> float:
        """Seconds per training step (forward + backward, no update), measured after 2 warm-up steps."""
        torch = self.torch
        params = [v.value for v in self.model.trainable_variables]
        for i in range(steps + 2):
            if i == 2:
                self._sync()
                started = time.time()
            idx = torch.randint(0, len(self.y_train), (self.batch_size,), device=self.device,
                                generator=self.generator)
            probs = self.model(self.augmenter(self.x_train[idx].float(), training=True), training=True)
            self._loss(probs, self.y_train[idx]).backward()
        for p in params:
            p.grad = None
        self._sync()
        return (time.time() - started) / steps

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run_phase(self, epochs: int, lr: float, schedule: str = "cosine", patience: int = 0,
                  deadline: float = 0.0, verbose: bool = True) -> dict:
        """Train `epochs` epochs; returns {"history", "best_epoch" (1-based, None without patience),
        "stopped_by_time_budget"}. With patience, restores the weights of the best validation loss."""
        torch = self.torch
        params = [v.value for v in self.model.trainable_variables]
        optimizer = torch.optim.Adam(params, lr=lr)
        total_steps = epochs * self.steps_per_epoch
        history: dict[str, list[float]] = {}
        best_loss, best_epoch, best_weights, waited, step = math.inf, None, None, 0, 0
        hit_deadline = False
        for epoch in range(epochs):
            started = time.time()
            order = torch.randperm(len(self.y_train), device=self.device, generator=self.generator)
            loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
            for i in range(self.steps_per_epoch):
                if schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(lr, step, total_steps)
                batch_loss, batch_correct = self._train_step(optimizer, order[i * self.batch_size:
                                                                              (i + 1) * self.batch_size])
                loss_sum += batch_loss
                correct += batch_correct
                step += 1
            logs = {"loss": float(loss_sum) / len(self.y_train), "accuracy": float(correct) / len(self.y_train)}
            logs.update(self.evaluate())
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            if verbose:
                print(f"epoch {epoch + 1}/{epochs} {time.time() - started:.1f}s "
                      + " ".join(f"{k}={v:.4f}" for k, v in logs.items()), flush=True)
            if patience:
                if logs["val_loss"] < best_loss:
                    best_loss, best_epoch, waited = logs["val_loss"], epoch + 1, 0
                    best_weights = [np.array(w) for w in self.model.get_weights()]
                else:
                    waited += 1
                    if waited >= patience:
                        print(f"early stop: no better validation loss for {patience} epochs")
                        break
            if deadline and time.time() > deadline:
                print(f"time budget reached after epoch {epoch + 1}")
                hit_deadline = True
                break
        if best_weights is not None:
            self.model.set_weights(best_weights)
        return {"history": history, "best_epoch": best_epoch, "best": best_loss,
                "stopped_by_time_budget": hit_deadline}
