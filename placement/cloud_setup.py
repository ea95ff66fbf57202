"""The Kubernetes cluster a plan needs, as the cloud's own tools create it: an eksctl
`ClusterConfig` for EKS, a gcloud script for GKE. Generated from the same node types the
RayService is sized for, so every pod has the pool it was checked against:

- a system pool (the Ray head, both Redis servers, the weights fill Job), an ingress pool (one
  node per ingress pod), and one GPU pool per node type, each of one machine type (the pods'
  node selector, `node.kubernetes.io/instance-type`), the GPU pools tainted `nvidia.com/gpu`
  (only GPU pods land there);
- GPU pools from `min_nodes` to `max_nodes`, scaled by the cluster autoscaler: on EKS the managed
  node groups carry the `k8s.io/cluster-autoscaler/node-template/...` tags that let it scale a
  group up from zero, on GKE the pools autoscale natively;
- the CSI drivers the claims need (EBS for the GCS Redis's volume, EFS for the weights; on GKE
  Filestore), and NVIDIA drivers >= 580 (EKS's AL2023 NVIDIA AMI on Kubernetes >= 1.34; GKE's
  `gpu-driver-version=latest`), which the image's CUDA 13 build needs.
"""

from __future__ import annotations

import shlex

from placement.inventory import Inventory, NodeType
from placement.machines import gpu_machine
from placement.planner import PlacementReport

EKS_VERSION = "1.34"  # the first whose accelerated AL2023 AMIs ship the R580 NVIDIA driver
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def _gpu_pool_name(node: NodeType) -> str:
    return f"gpu-{node.name}"


def render_eksctl(report: PlacementReport) -> dict:
    """An eksctl ClusterConfig (`eksctl create cluster -f eksctl.yaml`)."""
    inventory = report.inventory
    deployment = inventory.deployment
    name = deployment.cluster_name

    def group(pool: str, instance: str, low: int, high: int, desired: int, *, gpu: bool) -> dict:
        labels = {"rerank-fleet/pool": pool}  # (node.kubernetes.io/instance-type, the pods' selector, is set by the kubelet)
        tags = {"k8s.io/cluster-autoscaler/enabled": "true", f"k8s.io/cluster-autoscaler/{name}": "owned"}
        # What the cluster autoscaler needs to scale a group up from zero: the labels and taints its nodes will have.
        tags.update({f"k8s.io/cluster-autoscaler/node-template/label/{k}": v for k, v in labels.items()})
        entry: dict = {"name": pool, "instanceType": instance, "amiFamily": "AmazonLinux2023", "minSize": low, "maxSize": high,
                       "desiredCapacity": desired, "volumeSize": 300 if gpu else 100, "labels": labels,
                       "propagateASGTags": True, "privateNetworking": True, "iam": {"withAddonPolicies": {"autoScaler": True}}}  # fmt: skip
        if gpu:
            entry["taints"] = [dict(GPU_TAINT)]
            tags[f"k8s.io/cluster-autoscaler/node-template/taint/{GPU_TAINT['key']}"] = f"{GPU_TAINT['value']}:{GPU_TAINT['effect']}"
        entry["tags"] = tags
        return entry

    ingress = deployment.ingress
    groups = [
        group("system", deployment.system.aws_instance_type, 1, 3, 1, gpu=False),
        group("ingress", ingress.aws_instance_type, ingress.replicas, ingress.replicas, ingress.replicas, gpu=False),
    ]
    for node in inventory.node_types:
        instance = gpu_machine(node, "eks")
        if instance is None or node.k8s_node_selector:
            continue  # no EC2 instance carries this GPU, or its nodes join by hand (the RayService's notes say so)
        planned = report.plan.nodes[node.name]
        groups.append(group(_gpu_pool_name(node), instance, node.node_floor, max(node.node_ceiling, planned), planned, gpu=True))
    return {
        "apiVersion": "eksctl.io/v1alpha5",
        "kind": "ClusterConfig",
        "metadata": {"name": name, "region": deployment.aws_region, "version": EKS_VERSION},
        "iam": {"withOIDC": True},
        "addons": [
            {"name": "vpc-cni", "configurationValues": '{"enableNetworkPolicy": "true"}'},  # the NetworkPolicies are enforced
            {"name": "aws-ebs-csi-driver", "wellKnownPolicies": {"ebsCSIController": True}},  # the GCS Redis's volume
            {"name": "aws-efs-csi-driver", "wellKnownPolicies": {"efsCSIController": True}},  # the weights claim (ReadWriteMany)
        ],
        "managedNodeGroups": groups,
    }


def render_gke_script(report: PlacementReport) -> str:
    """The gcloud commands that create the GKE cluster and its node pools (`bash gke.sh`)."""
    inventory: Inventory = report.inventory
    deployment = inventory.deployment
    name, region = deployment.cluster_name, deployment.gcp_region
    project = deployment.gcp_project or "PROJECT_ID"

    def pool(pool_name: str, machine: str, start: int, low: int, high: int, extra: list[str]) -> str:
        return shlex.join(["gcloud", "container", "node-pools", "create", pool_name, "--project", project, "--cluster", name,
                           "--location", region, "--node-locations", deployment.gcp_zone, "--machine-type", machine,
                           "--num-nodes", str(start), "--enable-autoscaling", "--total-min-nodes", str(low), "--total-max-nodes", str(high),
                           "--node-labels", f"rerank-fleet/pool={pool_name}", *extra])  # fmt: skip

    ingress = deployment.ingress
    lines = [
        "#!/usr/bin/env bash",
        "# Creates the GKE cluster and node pools this plan was sized for (the machine types are the pods' node selectors).",
        "set -euo pipefail",
        shlex.join(["gcloud", "container", "clusters", "create", name, "--project", project, "--location", region,
                    "--node-locations", deployment.gcp_zone, "--release-channel", "regular", "--enable-dataplane-v2",
                    "--workload-pool", f"{project}.svc.id.goog", "--addons", "GcpFilestoreCsiDriver",
                    "--machine-type", deployment.system.gcp_machine_type, "--num-nodes", "1",
                    "--enable-autoscaling", "--total-min-nodes", "1", "--total-max-nodes", "3"]),  # fmt: skip
        pool("ingress", ingress.gcp_machine_type, ingress.replicas, ingress.replicas, ingress.replicas, []),
    ]
    for node in inventory.node_types:
        machine = gpu_machine(node, "gke")
        if machine is None or node.k8s_node_selector or node.gpu_model.gke_accelerator is None:
            continue
        planned = report.plan.nodes[node.name]
        accelerator = f"type={node.gpu_model.gke_accelerator},count={node.gpus_per_node},gpu-driver-version=latest"
        taint = f"{GPU_TAINT['key']}={GPU_TAINT['value']}:{GPU_TAINT['effect']}"
        lines.append(pool(_gpu_pool_name(node), machine, planned, node.node_floor, max(node.node_ceiling, planned),
                          ["--accelerator", accelerator, "--node-taints", taint]))
    return "\n".join(lines) + "\n"

