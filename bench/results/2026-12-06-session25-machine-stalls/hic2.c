#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <time.h>
static long long now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000LL+t.tv_nsec;}
int main(int argc,char**argv){
  double secs=atof(argv[1]); long long thr_us=atoll(argv[2]);
  struct sched_param p={.sched_priority=50};
  if(sched_setscheduler(0,SCHED_FIFO,&p)) perror("sched_setscheduler");
  struct timespec ts={0,1000000};
  long long start=now(), end=start+(long long)(secs*1e9);
  long long hist[8]={0}; long long lims[8]={500000,1000000,2000000,5000000,10000000,20000000,50000000,100000000};
  long long n=0;
  struct timespec wall; 
  for(;;){long long t0=now(); nanosleep(&ts,NULL); long long t=now(); if(t>end)break; n++;
    long long over=t-t0-1000000;
    for(int i=0;i<8;i++) if(over>lims[i]) hist[i]++;
    if(over>thr_us*1000){clock_gettime(CLOCK_REALTIME,&wall); printf("%ld.%03ld late %.2f ms\n",(long)wall.tv_sec,wall.tv_nsec/1000000,over/1e6);fflush(stdout);}}
  printf("%lld sleeps; late >0.5 >1 >2 >5 >10 >20 >50 >100 ms:",n);for(int i=0;i<8;i++)printf(" %lld",hist[i]);printf("\n");}
