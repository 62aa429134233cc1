# ViT-B/16 MAE pretraining, the paper's recipe (He et al. 2021, Table 8 / the official PRETRAIN.md):
# effective batch 4096, blr 1.5e-4 (lr = 1.5e-4 x 4096 / 256 = 2.4e-3), AdamW (0.9, 0.95), wd 0.05,
# 800 epochs (1600 for the best numbers), 40 warmup, mask 0.75, norm_pix_loss.
# 64 GPUs (8 nodes x 8) x batch 64 = 4096. Fewer GPUs: raise --accum_iter so the product stays 4096.
# Usage: source configs/recipes/mae_vit_base.sh && deepspeed --hostfile configs/hostfile fastmae/pretrain.py $MAE_ARGS --data_path /data/imagenet/train
MAE_ARGS="--model mae_vit_base_patch16 --input_size 224 --batch_size 64 --accum_iter 1 --epochs 800 --warmup_epochs 40 \
--blr 1.5e-4 --weight_decay 0.05 --mask_ratio 0.75 --norm_pix_loss --deepspeed_config configs/ds_zero1.json \
--output_dir ./output_vitb --save_every_steps 2000"
