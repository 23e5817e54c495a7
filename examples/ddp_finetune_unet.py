"""Fine-tune a diffusers U-Net on a latentray latent dataset with DistributedDataParallel.

    # 2 ranks on this machine (CPU, gloo), the U-Net of a diffusers directory, bucketed latents:
    python examples/ddp_finetune_unet.py --model /models/sd15 --latents s3://bucket/latents-buckets \
        --output finetuned/ --world-size 2 --steps 1000 --batch-size 16
    # or one process per GPU under torchrun (rank and world size from its environment, nccl):
    torchrun --nproc-per-node 8 examples/ddp_finetune_unet.py --model ... --latents ... --output ...

The latents come from `latentray encode --text-embeddings` (with or without --buckets) with the same
model's VAE and text encoder. ``LatentDataset`` does the data side of distributed training: every
rank gets the same number of batches (DDP would hang on a rank that runs out first), each batch holds
one latent shape (ranks may train different buckets in the same step: DDP only averages gradients),
no row is read twice in an epoch (drop_last), and the reader's state saved beside the model lets a
restarted run continue mid-epoch with exactly the batches it would have read.

Each step: noise the stored latents at random timesteps (the model's own scheduler), predict the noise
from the caption embeddings, MSE, AdamW. Rank 0 saves the U-Net to OUTPUT/unet and a checkpoint to
OUTPUT/checkpoint/ (model, optimizer, step, every rank's reader state); a rerun with more --steps resumes.
Each rank also writes OUTPUT/rank-<r>.json: the ids and latent shape of every batch it trained on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers directory whose unet/ and scheduler/ are fine-tuned")
    parser.add_argument("--latents", required=True, help="latentray encode output (any fsspec URI)")
    parser.add_argument("--output", required=True, help="local folder for the U-Net, checkpoint and per-rank records")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=2, help="ranks to start here on CPU (ignored under torchrun)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--collective-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="a rank waiting longer than this for the others fails with an error instead of hanging")
    return parser


def train(rank: int, world_size: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as distributed
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torchdata.stateful_dataloader import StatefulDataLoader

    from pipelines import LatentDataset

    # 1. the process group (gloo on CPU, nccl on GPUs)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() else torch.device("cpu")
    distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                   init_method=args.init_method, timeout=datetime.timedelta(seconds=args.collective_timeout))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))

    # 2. the data: rank and world size come from the process group
    dataset = LatentDataset(args.latents, columns=["id", "latent", "prompt_embeds"], batch_size=args.batch_size,
                            shuffle=True, seed=args.seed, drop_last=True)
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=args.workers)

    # 3. the model, optimizer and noise schedule; a checkpoint continues a previous run
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device).train()
    scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    model = torch.nn.parallel.DistributedDataParallel(unet)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    checkpoint_dir = os.path.join(args.output, "checkpoint")
    step, epoch, record = 0, 0, []
    if os.path.exists(os.path.join(checkpoint_dir, "state.pt")):
        state = torch.load(os.path.join(checkpoint_dir, "state.pt"), weights_only=False)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
        loader.load_state_dict(state["loaders"][rank])  # this rank's reader: mid-epoch, exactly where it stopped
        record = json.load(open(os.path.join(args.output, f"rank-{rank}.json")))["batches"]
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank * 100 + step)

    # 4. the step loop, epoch after epoch
    while step < args.steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            latents = batch["latent"].to(device, torch.float32)
            embeddings = batch["prompt_embeds"].to(device, torch.float32)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
            loss = F.mse_loss(model(scheduler.add_noise(latents, noise, timesteps), timesteps, embeddings).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of every rank here
            optimizer.step()
            step += 1
            record.append({"step": step, "epoch": epoch, "shape": list(latents.shape[1:]), "ids": batch["id"], "loss": loss.item()})
            if step == args.steps:
                break
        else:
            epoch += 1

    # 5. save: every rank's reader state goes into rank 0's checkpoint
    loaders = [None] * world_size
    distributed.all_gather_object(loaders, loader.state_dict())
    with open(os.path.join(args.output, f"rank-{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "world_size": world_size, "batches": record}, handle)
    if rank == 0:
        unet.save_pretrained(os.path.join(args.output, "unet"))
        os.makedirs(checkpoint_dir, exist_ok=True)
        torch.save({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "loaders": loaders},
                   os.path.join(checkpoint_dir, "state.pt"))
    distributed.barrier()
    # 6. tear down in order, while both ranks are here: DDP's reducer holds the process group,
    # which would otherwise be freed with train()'s locals after the other rank had left (one
    # rank was seen hanging there once: its stack ended in spawn's _wrap, after train returned)
    del model, optimizer
    distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.world_size < 1:
        print("ddp_finetune_unet: error: --steps, --batch-size and --world-size must be >= 1", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    if "RANK" in os.environ:  # under torchrun: its rendezvous (MASTER_ADDR/MASTER_PORT)
        args.init_method = "env://"
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return 0
    import tempfile

    import torch.multiprocessing

    # Ranks on one machine meet through a file, not a TCP port: a port probed free and then
    # released can be taken by another process before rank 0 binds it, and a rank that
    # connects to the wrong listener waits for a handshake that never comes
    with tempfile.TemporaryDirectory(prefix="ddp-rendezvous-") as rendezvous:
        args.init_method = "file://" + os.path.join(rendezvous, "store")
        torch.multiprocessing.spawn(train, args=(args.world_size, args), nprocs=args.world_size, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
