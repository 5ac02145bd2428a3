"""The names MLflow records for a run (README, "What MLflow records"): written by the trainer and its
callbacks, read by the tools. Per-epoch metrics have step = epoch; probe metrics are a prefix plus a block."""
TRAIN_LOSS, TRAIN_ACC, VAL_ACC = "train_loss", "train_acc", "val_acc"
LR_BACKBONE, LR_HEAD, HEAD_REINIT = "lr_backbone", "lr_head", "head_reinit"
# Frobenius norm of the head's weight just before and just after a re-init (epochs that end with one)
HEAD_NORM_PRE, HEAD_NORM_POST = "head_norm_pre_reinit", "head_norm_post_reinit"
TEST_ACC, TEST_ACC_LAST, SELECTED_EPOCH = "test_acc", "test_acc_last", "selected_epoch"
BEST_VAL_ACC, BEST_EPOCH = "best_val_acc", "best_epoch"
WEIGHT, GRAD = "weight_dist/", "grad_norm/"                   # + block: distance to pretrained, gradient norm
PRE, POST = "grad_norm_pre_reinit/", "grad_norm_post_reinit/"  # + block: around each head re-initialization
PROBES = (WEIGHT, GRAD, PRE, POST)
HISTORY = (VAL_ACC, TRAIN_ACC, LR_HEAD, HEAD_REINIT)  # the per-epoch curves the report draws, in this order
BEFORE_REINIT_TAG = "selected_before_reinit"  # 'true': a RIFLE run selected a checkpoint before its first re-init
