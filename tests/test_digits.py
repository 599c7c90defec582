"""asge_cnn_tiny learns real handwritten digits (scikit-learn's bundled 8x8 digits, resized to 16x16) with the
engine alone, and every prediction strategy reaches 90% test accuracy."""
import torch
import timm

from timm_asge import LocalLearner, choose_best_block, param_groups
from timm_asge.data import epoch_batches, load_tensors, split_train_val, to_model_input


def test_tiny_learns_digits_with_every_strategy():
    torch.manual_seed(0)
    train, test = load_tensors('digits', 'train', 16, 1), load_tensors('digits', 'test', 16, 1)
    train, val = split_train_val(train, 0.1, seed=0)
    model = timm.create_model('asge_cnn_tiny')
    engine = LocalLearner(model, mode='lean')
    optimizer = torch.optim.AdamW(param_groups(model, lr=2e-3, weight_decay=1e-3))
    epochs = 20
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g['lr'] for g in optimizer.param_groups],
                                                    total_steps=epochs * 21)
    for epoch in range(epochs):
        for _, images, labels in epoch_batches(train, 64, epoch):
            engine(to_model_input(images), labels)  # lean mode: the gradients are ready after forward
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    best, block_acc = choose_best_block(model, [(to_model_input(val.images), val.labels)])
    assert block_acc[best] == max(block_acc)
    model.eval()
    accuracy = {}
    for strategy in ('fusion', 'last', 'best'):
        model.set_prediction(strategy)
        with torch.no_grad():
            accuracy[strategy] = (model(to_model_input(test.images)).argmax(1) == test.labels).float().mean().item()
    assert min(accuracy.values()) >= 0.90, accuracy
